"""The status monitor's persistent state: this server's NSM state number and its clients.

On-disk layout, under the data directory (directory mode 0700, files 0600):

    nlm/state       the NSM state number, decimal, one line. Odd while a server runs; each
                    start moves it to the next odd number, so clients tell restarts apart.
    nlm/monitored   JSON {"clients": {ADDRESS: {"name": CALLER_NAME, "since": UNIX_TIME}}}:
                    every client that was granted a lock (or share reservation) and has not
                    been told of a restart since. It is written before the grant is answered.
    nlm/locks.json  what `prism locks` reads: the running server's locks (see
                    `prism.nlm.service`); removed on a clean stop, ignored unless its `pid`
                    is a live process.

Crash ordering: every file is replaced whole (temporary file, fsync, rename, fsync of the
directory), so a crash leaves the old or the new version, never a mix. A client is recorded
before it holds anything, so after any crash every client that may hold a lock is in
`monitored`: the next start notifies it (SM_NOTIFY) and keeps a grace period for its
reclaims. A client is forgotten only once it has been notified.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_GRACE = 90.0
"""Seconds after an unclean restart during which only lock reclaims are granted
(`prism serve --grace`)."""

log = logging.getLogger(__name__)

NLM_DIR = "nlm"
STATE_FILE = "state"
MONITORED_FILE = "monitored"
LOCKS_FILE = "locks.json"


class MonitorStateError(Exception):
    """The status monitor's files are unreadable."""


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` crash-safely, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True, slots=True)
class Client:
    address: str
    name: str
    since: float


class Monitor:
    """The state number and monitored clients of one data directory. Its methods may be
    called from several threads at once (the server runs them off its event loop): each
    change and the write of its file happen under one lock."""

    def __init__(self, data: Path) -> None:
        self.dir = Path(data) / NLM_DIR
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.state = 0
        self.clients: dict[str, Client] = {}
        self._lock = threading.Lock()
        self._load()

    @property
    def locks_path(self) -> Path:
        return self.dir / LOCKS_FILE

    def _load(self) -> None:
        state_path = self.dir / STATE_FILE
        try:
            text = state_path.read_text() if state_path.exists() else "0"
            self.state = int(text.strip() or "0")
            monitored = self.dir / MONITORED_FILE
            raw: dict[str, Any] = (
                json.loads(monitored.read_bytes()) if monitored.exists() else {"clients": {}}
            )
            self.clients = {
                addr: Client(addr, str(c["name"]), float(c["since"]))
                for addr, c in raw["clients"].items()
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MonitorStateError(
                f"cannot read the lock monitor's state in {self.dir} ({exc}); if it is "
                "damaged, remove that directory (clients then get no restart notice)"
            ) from exc

    def restart(self) -> int:
        """Move to the next odd state number (on every server start) and persist it. A full
        disk must not keep the server from starting (clients need it to free space): the
        state is then rewritten in place, or, failing that, kept in memory with a warning."""
        with self._lock:
            self.state = (self.state | 1) + 2 if self.state else 1
            data = f"{self.state}\n".encode()
            try:
                write_private(self.dir / STATE_FILE, data)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self._overwrite_state(data, exc)
            return self.state

    def _overwrite_state(self, data: bytes, cause: OSError) -> None:
        """Rewrite the state file's bytes where they are (no new block on a full disk)."""
        path = self.dir / STATE_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, data.ljust(os.fstat(fd).st_size, b" "), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning(
                "cannot record the lock monitor's state %d in %s (%s, then %s): lock clients "
                "may not learn of a restart until there is room; free space in the data "
                "directory",
                self.state,
                path,
                cause.strerror,
                exc.strerror,
            )

    def add(self, address: str, name: str) -> bool:
        """Record a client before it is granted anything; False if it already was."""
        with self._lock:
            if address in self.clients:
                return False
            self.clients = {**self.clients, address: Client(address, name, time.time())}
            self._save()
            return True

    def forget(self, addresses: Iterable[str]) -> None:
        with self._lock:
            gone = set(addresses) & set(self.clients)
            if gone:
                self.clients = {a: c for a, c in self.clients.items() if a not in gone}
                self._save()

    def _save(self) -> None:
        body = {
            "clients": {
                c.address: {"name": c.name, "since": c.since} for c in self.clients.values()
            }
        }
        write_private(self.dir / MONITORED_FILE, json.dumps(body, sort_keys=True).encode())


def read_locks(data: Path) -> dict[str, Any] | None:
    """The running server's lock table (`nlm/locks.json`), or None if no server runs on
    `data` (no file, or the process that wrote it is gone)."""
    path = Path(data) / NLM_DIR / LOCKS_FILE
    try:
        table: dict[str, Any] = json.loads(path.read_bytes())
        os.kill(int(table["pid"]), 0)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise MonitorStateError(f"{path} is unreadable ({exc}); restart the server") from exc
    return table
