"""Helpers for the operator tests: run `prism` / `prism-clone` as a user types them, and run
`prism serve` as a separate process.

`run_prism(data, "vm", "create", "web")` runs `python3 -m prism vm create web --data DATA`;
`run_clone(data, ...)` runs `prism-clone` (the installed script if it is on PATH, else the
same entry point through `python3 -c`). Both return the CompletedProcess; `.json()` style
parsing is left to the caller so failures show the raw output.

`PrismServe(data)` starts `python3 -m prism serve --data DATA --bind 0.0.0.0 --nfs-port 0
--mount-port 0 --no-portmap`, waits for the line starting "prism: ready:" and reads the
ports the server actually bound from it, so parallel runs never collide on ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from prism.nfs.client import MountClient, NfsClient
from prism.nfs.types import NfsFh3

REPO_ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"^prism: ready: .* nfs (?P<bind>\S+):(?P<nfs>\d+) mount (?P<mount>\d+) ")
START_TIMEOUT = 30.0


def env() -> dict[str, str]:
    out = dict(os.environ)
    old = out.get("PYTHONPATH")
    out["PYTHONPATH"] = str(REPO_ROOT) if not old else f"{REPO_ROOT}{os.pathsep}{old}"
    out.pop("PRISM_DATA", None)
    return out


def clone_command() -> list[str]:
    """How a user runs prism-clone here: the installed script, else its entry point."""
    script = shutil.which("prism-clone")
    if script is not None:
        return [script]
    return [
        sys.executable,
        "-c",
        "import sys; from prism.cli import clone_main; sys.exit(clone_main())",
    ]


def _run(
    argv: list[str],
    data: Path | None,
    *,
    extra_env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    full = [*argv, "--data", str(data)] if data is not None else argv
    e = env()
    if extra_env:
        e.update(extra_env)
    return subprocess.run(
        full, capture_output=True, text=True, env=e, cwd=cwd, timeout=120, check=False
    )


def run_prism(
    data: Path | None,
    *args: str,
    extra_env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python3 -m prism ARGS --data DATA` (no --data when `data` is None)."""
    return _run([sys.executable, "-m", "prism", *args], data, extra_env=extra_env, cwd=cwd)


def run_clone(data: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    """`prism-clone ARGS --data DATA`."""
    return _run([*clone_command(), *args], data)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """stdout of a command that must have succeeded (with its stderr in the failure)."""
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc))


def prism(data: Path, *args: str) -> str:
    return ok(run_prism(data, *args))


def prism_json(data: Path, *args: str) -> Any:
    return ok_json(run_prism(data, *args, "--json"))


class PrismServe:
    """`prism serve` in a child process; stopped with SIGTERM on exit."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.data = data
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.nfs_port = self.mount_port = 0
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> Self:
        argv = [
            sys.executable,
            "-m",
            "prism",
            "serve",
            "--data",
            str(self.data),
            "--bind",
            "0.0.0.0",
            "--nfs-port",
            "0",
            "--mount-port",
            "0",
            "--no-portmap",
            *self.extra,
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(),
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = READY.match(line)
            if m:
                self.nfs_port, self.mount_port = int(m["nfs"]), int(m["mount"])
                # keep draining the log so the server never blocks on a full pipe
                self._reader = threading.Thread(target=self._drain, daemon=True)
                self._reader.start()
                return self
        self.stop()
        raise RuntimeError("prism serve did not become ready:\n" + "".join(self.lines))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        return "".join(self.lines)

    # -- clients (from the root namespace, over loopback) --------------------------------

    def mount(self, export: str, host: str = "127.0.0.1") -> tuple[NfsClient, NfsFh3]:
        """MNT `export` and open an NFS client; the caller closes the client."""
        with MountClient(host, self.mount_port) as m:
            fh, _ = m.mnt(export)
        return NfsClient(host, self.nfs_port), fh

    def url(self, host: str, export: str) -> str:
        """A libnfs URL (nfs-ls, nfs-cat) that needs no portmapper."""
        return f"nfs://{host}{export}?nfsport={self.nfs_port}&mountport={self.mount_port}"
