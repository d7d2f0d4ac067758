"""`prism serve` as a service: its config file, systemd readiness (sd_notify), SIGHUP reload
and log reopening, and journald-friendly log lines.

Each test runs a real `prism serve` subprocess on ephemeral ports against a real data
directory; readiness is read from a real Unix datagram socket given as $NOTIFY_SOCKET, as
systemd gives it; a MOUNT of an unknown export (logged at INFO by the server) shows which
log level is in force.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.client import MountClient
from tests.op_helpers import prism
from tests.op_helpers import run_prism as run
from tests.server_helpers import PrismProcess

READY = re.compile(r"^prism: ready: .* nfs (?P<bind>\S+):(?P<nfs>\d+) mount (?P<mount>\d+) ")
REFUSED = "refused: not a VM name"  # the server's INFO line for a MOUNT of a bad name


class Notifications:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float = 30.0) -> dict[str, str]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no notification from the server"
        msg = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in msg.splitlines())

    def close(self) -> None:
        self.sock.close()


class Serve:
    """`prism serve` through the one launcher (tests/server_helpers.PrismProcess), on
    ephemeral ports; the ready line gives the MOUNT port."""

    def __init__(
        self,
        data: Path,
        log_dir: Path,
        *args: str,
        extra_env: dict[str, str] | None = None,
        portmap: bool = False,
    ) -> None:
        self.server = PrismProcess(
            data, log_dir, extra_args=args, env=extra_env, nfs_port=0, mount_port=0, portmap=portmap
        )
        self.ready_line = self.server.start()
        m = READY.match(self.ready_line)
        assert m, self.ready_line
        self.mount_port = int(m.group("mount"))
        assert self.server.proc is not None
        self.proc = self.server.proc

    def mount_bad_name(self) -> None:
        """A MOUNT the server refuses and logs at INFO."""
        with MountClient("127.0.0.1", self.mount_port) as m:
            m.null()
            with pytest.raises(Exception):  # noqa: B017 - any refusal; the log line is checked
                m.mnt("/Not_A_VM")

    def stop(self) -> str:
        """Stops cleanly; returns stderr."""
        self.server.stop()
        return self.server.stderr()


def refused_start(data: Path, log_dir: Path, *args: str, **kw: Any) -> str:
    """`prism serve ARGS` that must exit before it is ready: its one line of stderr."""
    server = PrismProcess(data, log_dir, extra_args=args, nfs_port=0, mount_port=0, **kw)
    with pytest.raises(AssertionError, match="exited before ready"):
        server.start()
    err = server.stderr()
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    prism(d, "vm", "create", "vm")
    return d


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notifications]:
    n = Notifications(tmp_path / "notify.sock")
    yield n
    n.close()


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


# -- the config file ------------------------------------------------------------------------


def test_config_file_sets_options_and_the_command_line_overrides(
    data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "prism.toml"
    log = tmp_path / "prism.log"
    config.write_text(
        f'data = "{tmp_path / "elsewhere"}"\nlog-level = "warning"\nlog-file = "{log}"\n'
        "max-connections-per-address = 7\nno-portmap = true\n"
    )
    # log level, log file and no-portmap come from the file; --data wins over its data
    server = Serve(data, tmp_path / "logs", "--config", str(config), portmap=True)
    assert f"from {data};" in server.ready_line and "no portmap" in server.ready_line
    server.mount_bad_name()
    server.stop()
    assert REFUSED not in log.read_text()  # warning from the file: INFO is not logged
    assert not (tmp_path / "elsewhere").exists()

    # the command line wins over the file
    server = Serve(data, tmp_path / "logs", "--config", str(config), "--log-level", "info")
    server.mount_bad_name()
    server.stop()
    wait_for(lambda: REFUSED in log.read_text())


def test_the_default_config_file_names_the_store_for_every_command(
    data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "prism.toml"
    config.write_text(f'data = "{data}"\nno-portmap = true\n')
    cfg = {"PRISM_CONFIG": str(config)}
    listed = run(None, "vm", "list", "-H", "-o", "name", extra_env=cfg, cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout == "vm\n", listed.stderr
    # --data and $PRISM_DATA still win over the file
    other = tmp_path / "other"
    prism(other, "vm", "create", "other")
    proc = run(other, "vm", "list", "-H", "-o", "name", extra_env=cfg)
    assert proc.stdout == "other\n"
    proc = run(None, "vm", "list", "-H", "-o", "name", extra_env=cfg | {"PRISM_DATA": str(other)})
    assert proc.stdout == "other\n"
    # serve reads it without --config
    server = Serve(data, tmp_path / "logs", extra_env=cfg, portmap=True)
    assert "no portmap" in server.ready_line
    server.stop()
    config.write_text("nfs-prot = 1\n")
    proc = run(None, "vm", "list", extra_env=cfg, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown key 'nfs-prot'" in proc.stderr, proc.stderr


def test_the_command_line_overrides_the_files_choice_among_exclusive_options(
    data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "prism.toml"
    config.write_text("no-vrpc = true\n")
    server = Serve(data, tmp_path / "logs", "--config", str(config))
    assert "no vrpc" in server.ready_line
    server.stop()
    sock = tmp_path / "vrpc.sock"
    server = Serve(data, tmp_path / "logs", "--config", str(config), "--vrpc", str(sock))
    assert f"vrpc {sock}" in server.ready_line
    server.stop()


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("nfs_port = 2049\n", "unknown key 'nfs_port'; did you mean 'nfs-port'?"),
        ("colour = 'blue'\n", "unknown key 'colour'"),
        ("nfs-port = 99999\n", "nfs-port: port '99999' is out of range"),
        ("metrics = 9100\n", "metrics: '9100' has no address"),
        ("async = 'yes'\n", "async is a flag: write async = true or async = false"),
        ("log-level = 'loud'\n", "log-level: 'loud' is not one of debug, info"),
        ("nfs-port = \n", "is not valid TOML"),
        ("vrpc = '/run/x.sock'\nno-vrpc = true\n", "vrpc and no-vrpc exclude each other"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, text: str, hint: str) -> None:
    config = tmp_path / "prism.toml"
    config.write_text(text)
    err = refused_start(tmp_path / "data", tmp_path / "logs", "--config", str(config))
    assert str(config) in err and hint in err, err


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (("--metrics", "9100"), "give ADDR:PORT, e.g. 127.0.0.1:9100"),
        (("--nfs-port", "99999"), "out of range: give 1-65535"),
        (("--bind", "nfs.example"), "is not an IP address"),
        # TEST-NET-1 (RFC 5737) is on no interface; refused before anything listens
        (("--bind", "192.0.2.77"), "this host has no such address"),
        (("--metrics", "192.0.2.77:0"), "--metrics 192.0.2.77"),
        (("--config", "/no/such/prism.toml"), "cannot read config"),
        # siblings: every port, count and duration option, and the log file
        (("--mount-port", "99999"), "out of range: give 1-65535"),
        (("--nlm-port", "-1"), "out of range: give 1-65535"),
        (("--metrics", "127.0.0.1:70000"), "out of range: give 1-65535"),
        (("--bind", "2001:db8::77"), "this host has no such address"),
        (("--max-connections", "0"), "at least 1"),
        (("--record-timeout", "nan"), "positive number of seconds"),
        (("--grace", "-1"), "0 or more"),
        (("--log-file", "/no/such/dir/prism.log"), "give a file in an existing directory"),
    ],
)
def test_serve_refuses_bad_options_in_one_line(
    data: Path, tmp_path: Path, args: tuple[str, ...], hint: str
) -> None:
    assert hint in refused_start(data, tmp_path / "logs", *args)


def test_every_serve_option_is_a_config_key() -> None:
    from prism.cli.config import config_options, subparser
    from prism.cli.parser import build_parser

    serve = subparser(build_parser(), "serve")
    keys = set(config_options(serve))
    flags = {o[2:] for a in serve._actions for o in a.option_strings if o.startswith("--")}
    assert keys == flags - {"help", "config"}


# -- systemd: readiness, reload, logging ------------------------------------------------------


def test_sd_notify_ready_reload_and_stopping(
    data: Path, tmp_path: Path, notify: Notifications
) -> None:
    config = tmp_path / "prism.toml"
    config.write_text('log-level = "warning"\n')
    server = Serve(
        data,
        tmp_path / "logs",
        "--config",
        str(config),
        extra_env={"NOTIFY_SOCKET": str(notify.path)},
    )
    msg = notify.next()
    assert msg["READY"] == "1" and msg["MAINPID"] == str(server.proc.pid)
    assert msg["STATUS"].startswith("prism: ready:")

    server.mount_bad_name()  # not logged: warning
    config.write_text('log-level = "info"\n')
    server.proc.send_signal(signal.SIGHUP)
    msg = notify.next()
    assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) > 0
    assert notify.next() == {"READY": "1"}
    assert server.proc.poll() is None  # SIGHUP no longer kills the server
    server.mount_bad_name()  # still serving, and now logged: info applied

    # a broken config on reload: an error, still serving with what it had
    config.write_text("nfs-port = 'x'\n")
    server.proc.send_signal(signal.SIGHUP)
    assert notify.next()["RELOADING"] == "1" and notify.next() == {"READY": "1"}
    server.mount_bad_name()
    # a setting that needs a restart is named, not silently ignored
    config.write_text('log-level = "info"\ngrace = 5\n')
    server.proc.send_signal(signal.SIGHUP)
    assert notify.next()["RELOADING"] == "1" and notify.next() == {"READY": "1"}

    err = server.stop()  # SIGTERM, a clean exit
    assert notify.next() == {"STOPPING": "1"}
    assert err.count(REFUSED) == 2, err
    assert "reload failed, still serving with the previous settings" in err
    assert "need a restart to apply (systemctl restart prism): grace" in err


def test_sighup_reopens_the_log_file(data: Path, tmp_path: Path) -> None:
    log = tmp_path / "prism.log"
    server = Serve(data, tmp_path / "logs", "--log-file", str(log))
    server.mount_bad_name()
    wait_for(lambda: REFUSED in log.read_text())
    log.rename(tmp_path / "prism.log.1")  # what logrotate does
    server.proc.send_signal(signal.SIGHUP)
    wait_for(log.exists)
    server.mount_bad_name()
    wait_for(lambda: REFUSED in log.read_text())
    server.stop()
    assert (tmp_path / "prism.log.1").read_text().count(REFUSED) == 1


def test_log_lines_under_journald_have_priority_and_no_timestamp(
    data: Path, tmp_path: Path
) -> None:
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ prism\.nfs\S* INFO .*" + REFUSED)
    plain = Serve(data, tmp_path / "plain")
    plain.mount_bad_name()
    err = plain.stop()
    assert any(stamp.match(line) for line in err.splitlines()), err

    # stderr is a stream whose device:inode $JOURNAL_STREAM names, as journald sets it up
    # (the launcher reopens this file, truncated, as the server's stderr: same inode)
    logs = tmp_path / "journal"
    logs.mkdir()
    stream = logs / "serve-1.err"
    stream.touch()
    st = os.stat(stream)
    server = Serve(data, logs, extra_env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    server.mount_bad_name()
    journal = server.stop()
    lines = [line for line in journal.splitlines() if REFUSED in line]
    assert lines and all(re.fullmatch(r"<6>prism\.nfs\S*: MNT .*", x) for x in lines), journal
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", journal), journal


def test_the_unit_file_is_valid_and_uses_notify_and_sighup() -> None:
    unit = Path(__file__).resolve().parent.parent / "contrib" / "prism.service"
    lines = unit.read_text().splitlines()
    assert "Type=notify" in lines and "ExecReload=/bin/kill -HUP $MAINPID" in lines
    assert any(x.startswith("ExecStart=") and "prism serve" in x for x in lines)
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, proc.stderr
