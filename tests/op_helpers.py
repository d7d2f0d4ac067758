"""Helpers for the operator tests: run `prism` / `prism-clone` as a user types them, and run
`prism serve` as a separate process.

`run_prism(data, "vm", "create", "web")` runs `python3 -m prism vm create web --data DATA`;
`run_clone(data, ...)` runs `prism-clone` (the installed script if it is on PATH, else the
same entry point through `python3 -c`). Both return the CompletedProcess; `.json()` style
parsing is left to the caller so failures show the raw output.

`PrismServe(data)` starts `python3 -m prism serve --data DATA --bind 0.0.0.0 --nfs-port 0
--mount-port 0 --no-portmap` through `tests.server_helpers.PrismProcess`, which waits for the
line starting "prism: ready:" and reads the ports the server actually bound from it, so
parallel runs never collide on ports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from prism.nfs.client import MountClient, NfsClient, NfsError, auth_sys
from prism.nfs.const import Nfs3Proc, NfsStat3
from prism.nfs.wire import NfsFh3, Sattr3
from prism.store.types import FileType
from tests.server_helpers import PrismProcess

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    """`prism serve` in a child process (`tests.server_helpers.PrismProcess`) on ephemeral
    ports of every address; stopped with SIGTERM on exit. Its output (stdout, then stderr)
    goes to files beside the data directory."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.data = data
        self.extra = extra
        self.process = PrismProcess(
            data,
            data.parent / f"{data.name}-logs",
            bind="0.0.0.0",
            nfs_port=0,
            mount_port=0,
            extra_args=extra,
        )

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc

    @property
    def nfs_port(self) -> int:
        return self.process.nfs_port

    @property
    def mount_port(self) -> int:
        return self.process.mount_port

    @property
    def lines(self) -> list[str]:
        """The server's output so far, stdout's lines then stderr's."""
        return self.log().splitlines(keepends=True)

    def start(self) -> Self:
        self.process.start()
        return self

    def stop(self) -> None:
        """SIGTERM, if running (exit status unchecked: some tests make the server fail)."""
        if self.process.proc is not None:
            self.process.stop(check=False)

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
        return self.process.stdout() + self.process.stderr()

    # -- clients (from the root namespace, over loopback) --------------------------------

    def mount(
        self, export: str, host: str = "127.0.0.1", *, uid: int = 0, gid: int = 0
    ) -> tuple[NfsClient, NfsFh3]:
        """MNT `export` and open an NFS client calling as AUTH_SYS uid/gid (root by
        default); the caller closes the client."""
        with MountClient(host, self.mount_port) as m:
            fh, _ = m.mnt(export)
        return NfsClient(host, self.nfs_port, cred=auth_sys(uid, gid)), fh

    def url(self, host: str, export: str) -> str:
        """A libnfs URL (nfs-ls, nfs-cat) that needs no portmapper."""
        return f"nfs://{host}{export}?nfsport={self.nfs_port}&mountport={self.mount_port}"


# -- NFS conveniences (each raises NfsError on failure) -----------------------------------


def nfs_mkdirs(c: NfsClient, root: NfsFh3, path: str) -> NfsFh3:
    """`mkdir -p` of a relative path; returns the last directory's handle."""
    fh = root
    for part in [p for p in path.split("/") if p]:
        res = c.lookup(fh, part)
        if res.status == NfsStat3.NFS3ERR_NOENT:
            made = c.mkdir(fh, part, Sattr3(mode=0o755))
            if not made.ok or made.obj is None:
                raise NfsError(Nfs3Proc.MKDIR, made.status, part)
            fh = made.obj
        elif res.ok and res.object is not None:
            fh = res.object
        else:
            raise NfsError(Nfs3Proc.LOOKUP, res.status, part)
    return fh


def nfs_put(c: NfsClient, root: NfsFh3, path: str, data: bytes) -> NfsFh3:
    """Create or truncate the file at relative `path` (its directory must exist), write it."""
    parent, _, name = path.strip("/").rpartition("/")
    dir_fh = c.walk(root, parent)
    res = c.create(dir_fh, name, Sattr3(mode=0o644, size=0))
    if not res.ok or res.obj is None:
        raise NfsError(Nfs3Proc.CREATE, res.status, path)
    c.write_all(res.obj, data)
    return res.obj


def nfs_get(c: NfsClient, root: NfsFh3, path: str) -> bytes:
    return c.read_all(c.walk(root, path.strip("/")))


def nfs_tree(c: NfsClient, root: NfsFh3) -> dict[str, Any]:
    """Relative path -> file content, "<dir>", or ("->", symlink target), via READDIRPLUS."""
    out: dict[str, Any] = {}
    stack = [("", root)]
    while stack:
        prefix, fh = stack.pop()
        for entry in c.listdir(fh):
            if entry.name in (b".", b".."):
                continue
            assert entry.name_handle is not None and entry.name_attributes is not None
            rel = prefix + entry.name.decode()
            kind = entry.name_attributes.type
            if kind == FileType.DIR:
                out[rel] = "<dir>"
                stack.append((rel + "/", entry.name_handle))
            elif kind == FileType.LNK:
                out[rel] = ("->", c.readlink(entry.name_handle).data)
            elif kind == FileType.REG:
                out[rel] = c.read_all(entry.name_handle)
            else:
                out[rel] = f"<{kind.name}>"
    return out
