"""Run a real `python3 -m prism serve`: start, wait for ready, stop, restart, kill.

The one launcher of `prism serve` for the tests (`tests.op_helpers.PrismServe` wraps it) and
the benchmarks (`benchmarks/run.py`).

Theory of operation: `PrismProcess(data, log_dir)` starts the server as a subprocess with
stdout and stderr going to files in `log_dir`, polls stdout for the "prism: ready:" line and
reads the NFS and MOUNT ports it bound from it. Ports: by default it picks ports that are
free for both TCP and UDP on 127.0.0.1 (the server listens on both with the same number),
and if the very first start loses a port race it retries with fresh ones; `nfs_port=0,
mount_port=0` lets the server take ephemeral ones (each start anew); given numbers are used
as they are. `stop()` sends SIGTERM and asserts what an operator relies on: exit status 0
and "prism: stopped cleanly". `kill()` is `kill -9` (a crash). `restart()` starts a new
process on the same data directory and ports, so clients keep their addresses and file
handles. `command` is how to run `prism` (this Python's `-m prism` by default; a benchmark
may run another checkout's). `wrap` runs the server inside something (`ip netns exec NS`),
and `address` is where the test's clients then reach it.

`prism_cli(data, ...)` runs the operator's CLI (`python3 -m prism ... --data DIR`) against
the same data directory, which is allowed while the server runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.wire import NfsFh3

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_PREFIX = "prism: ready:"
STOPPED_LINE = "prism: stopped cleanly"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0
_READY_RE = re.compile(r"nfs (?P<bind>\S+):(?P<nfs>\d+) mount (?P<mount>\d+)")
_PORT_RACE_RETRIES = 5
PRISM_COMMAND = (sys.executable, "-m", "prism")


def free_port(host: str = HOST) -> int:
    """A port number that is currently free for both TCP and UDP on `host`."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP")


def port_listening(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def prism_cli(
    data: Path, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run `python3 -m prism ARGS --data DATA`; with `check`, a non-zero exit fails loudly."""
    argv = [sys.executable, "-m", "prism", *args, "--data", str(data)]
    proc = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv[1:])} exited {proc.returncode}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


class PrismProcess:
    """One `prism serve` subprocess over one data directory (see the module docstring)."""

    def __init__(
        self,
        data: Path,
        log_dir: Path,
        *,
        portmap: bool = False,
        portmap_port: int | None = None,
        bind: str = HOST,
        extra_args: Sequence[str] = (),
        wrap: Sequence[str] = (),
        address: str = HOST,
        env: dict[str, str] | None = None,
        nfs_port: int | None = None,
        mount_port: int | None = None,
        command: Sequence[str] = PRISM_COMMAND,
        preexec_fn: Callable[[], None] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.data = Path(data)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.portmap = portmap
        self.portmap_port = portmap_port
        self.bind = bind
        self.extra_args = tuple(extra_args)
        self.wrap = tuple(wrap)
        self.address = address
        self.env = dict(env or {})
        """Environment variables the server runs with beyond ours (PRISM_VRPC_BACKEND...)."""
        self._pick_ports = nfs_port is None and mount_port is None
        self._ephemeral = nfs_port == 0 and mount_port == 0
        self.nfs_port = nfs_port or 0
        self.mount_port = mount_port or 0
        self.command = tuple(command)
        self.preexec_fn = preexec_fn
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""
        self.starts = 0
        self._stdout: Path | None = None
        self._stderr: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        """The `prism serve` command line of the next start."""
        argv = [
            *self.wrap,
            *self.command,
            "serve",
            "--data",
            str(self.data),
            "--bind",
            self.bind,
            "--nfs-port",
            str(self.nfs_port),
            "--mount-port",
            str(self.mount_port),
        ]
        if not self.portmap:
            argv.append("--no-portmap")
        elif self.portmap_port is not None:
            argv += ["--portmap-port", str(self.portmap_port)]
        return argv + list(self.extra_args)

    def start(self) -> str:
        """Start the server and wait for its ready line (which is returned)."""
        assert not self.running, "server already running"
        first = self._pick_ports and self.nfs_port == 0
        if self._ephemeral:
            self.nfs_port = self.mount_port = 0
        for attempt in range(_PORT_RACE_RETRIES if first else 1):
            if first:
                self.nfs_port = free_port()
                self.mount_port = free_port()
                while self.mount_port == self.nfs_port:
                    self.mount_port = free_port()
            try:
                return self._start_once()
            except _PortInUse:
                if attempt + 1 == (_PORT_RACE_RETRIES if first else 1):
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> str:
        self.starts += 1
        self._stdout = self.log_dir / f"serve-{self.starts}.out"
        self._stderr = self.log_dir / f"serve-{self.starts}.err"
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=REPO_ROOT,
                env=_env() | self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=self.preexec_fn,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for line in self.stdout().splitlines():
                if line.startswith(READY_PREFIX):
                    self.ready_line = line
                    self._check_ready_line(line)
                    return line
            if self.proc.poll() is not None:
                stderr = self.stderr()
                self.proc = None
                if "cannot listen" in stderr:
                    raise _PortInUse(stderr)
                raise AssertionError(f"prism serve exited before ready:\n{stderr}")
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise AssertionError(f"prism serve not ready in {self.start_timeout} s:\n{self.stderr()}")

    def _check_ready_line(self, line: str) -> None:
        m = _READY_RE.search(line)
        assert m, f"unparsable ready line: {line!r}"
        bound = int(m["nfs"]), int(m["mount"])
        if self._ephemeral:
            self.nfs_port, self.mount_port = bound
        assert bound == (self.nfs_port, self.mount_port), line

    def stop(self, *, check: bool = True) -> str:
        """SIGTERM; with `check`, asserts exit status 0 and "stopped cleanly". Returns the
        stdout."""
        assert self.proc is not None, "server not running"
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"prism serve ignored SIGTERM for {STOP_TIMEOUT} s") from None
        out = self.stdout()
        if check:
            assert rc == 0, f"prism serve exited {rc}\n{self.stderr()}"
            assert STOPPED_LINE in out.splitlines(), f"no {STOPPED_LINE!r} in:\n{out}"
        return out

    def kill(self) -> None:
        """`kill -9`: the server gets no chance to commit or clean up."""
        assert self.proc is not None, "server not running"
        proc, self.proc = self.proc, None
        proc.kill()
        proc.wait()

    def restart(self, *, crash: bool = False) -> str:
        """Stop (or, with `crash`, kill -9) and start again on the same data and ports."""
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def close(self) -> None:
        """Stop if running (for fixture teardown); asserts a clean stop."""
        if self.proc is not None:
            self.stop()

    def __enter__(self) -> PrismProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self.proc is not None:
            with contextlib.suppress(Exception):
                self.stop()

    # -- output ------------------------------------------------------------------------------

    def stdout(self) -> str:
        return self._stdout.read_text("utf-8", "replace") if self._stdout else ""

    def stderr(self) -> str:
        return self._stderr.read_text("utf-8", "replace") if self._stderr else ""

    def all_stderr(self) -> str:
        """stderr of every start so far."""
        return "".join(
            p.read_text("utf-8", "replace") for p in sorted(self.log_dir.glob("serve-*.err"))
        )

    # -- clients -----------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return prism_cli(self.data, *args, check=check)

    # Over "vrpc" a client is a channel of its own, bound to VM `vm` ("vm" by default), on
    # the control socket the ready line names.

    def vrpc_socket(self) -> Path:
        m = re.search(r"vrpc (?P<path>\S+),", self.ready_line)
        assert m, f"the server listens for no VRPC channels: {self.ready_line!r}"
        return Path(m["path"])

    def rpc_client(
        self, prog: int, vers: int, transport: str = "tcp", *, vm: str = "vm", **kw: Any
    ) -> Any:
        """An `rpc.client.RpcClient` to `prog` (on the NFS or MOUNT port), or over "vrpc"
        its look-alike over a channel of `vm` (`vrpc.client.ChannelRpc`)."""
        from rpc.client import RpcClient
        from vrpc.client import VrpcChannel

        if transport == "vrpc":
            kw.pop("reserved_port", None)
            timeout = kw.pop("timeout", 10.0)
            channel = VrpcChannel.attach(self.vrpc_socket(), vm, timeout=timeout)
            return channel.rpc(prog, vers, kw.pop("cred", None), owns=True)
        port = self.mount_port if prog == 100005 else self.nfs_port
        return RpcClient(self.address, port, prog, vers, transport=transport, **kw)

    def mount_client(self, transport: str = "tcp", *, vm: str = "vm", **kw: Any) -> MountClient:
        kw.setdefault("cred", auth_sys())
        if transport == "vrpc":
            return MountClient(rpc=self.rpc_client(100005, 3, "vrpc", vm=vm, **kw))
        return MountClient(self.address, self.mount_port, transport, **kw)

    def nfs_client(self, transport: str = "tcp", *, vm: str = "vm", **kw: Any) -> NfsClient:
        """An NfsClient; root (AUTH_SYS uid 0) unless `cred` is given."""
        kw.setdefault("cred", auth_sys())
        if transport == "vrpc":
            return NfsClient(rpc=self.rpc_client(100003, 3, "vrpc", vm=vm, **kw))
        return NfsClient(self.address, self.nfs_port, transport, **kw)

    def mount(self, export: str = "/vm", transport: str = "tcp") -> NfsFh3:
        """MNT `export` and return its root handle (over "vrpc": on a channel of its VM)."""
        vm = export.strip("/").split("/")[0].split("@")[0]
        with self.mount_client(transport, vm=vm) as m:
            fh, _ = m.mnt(export)
        return fh

    def url(self, path: str) -> str:
        """A libnfs URL for `path` (starting with the export), bypassing the portmapper."""
        return f"nfs://{self.address}{path}?nfsport={self.nfs_port}&mountport={self.mount_port}&version=3"


def dump_host(client: MountClient) -> bytes:
    """The host name MOUNT's DUMP records for `client`: its address, or over VRPC the
    channel's duplicate-request-cache name (`vrpc:VM:UID:CLIENT_ID`)."""
    rpc = client._rpc
    channel = getattr(rpc, "channel", None)
    if channel is None:
        return HOST.encode()
    return f"vrpc:vm:{os.getuid()}:{channel.client_id.hex()}".encode()


class _PortInUse(AssertionError):
    """The server could not bind a port picked for it (another process took it)."""


def new_data_dir(path: Path, vms: Sequence[str] = ("vm",)) -> Path:
    """A fresh data directory holding the given VMs (loopback clients, no quota)."""
    path.mkdir(parents=True, exist_ok=True)
    for vm in vms:
        prism_cli(path, "vm", "create", vm)
    return path


@contextlib.contextmanager
def running_server(path: Path, **kw: Any) -> Iterator[PrismProcess]:
    """A server on a fresh data directory under `path` with VM "vm"; stopped cleanly after."""
    data = new_data_dir(path / "data")
    server = PrismProcess(data, path / "logs", **kw)
    server.start()
    try:
        yield server
    except BaseException:
        if server.running:
            with contextlib.suppress(Exception):
                server.stop()
        raise
    server.close()
