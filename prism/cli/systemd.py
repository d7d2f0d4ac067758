"""Fitting `prism serve` into a service manager: readiness notification and logging.

sd_notify: systemd passes a Unix datagram socket in $NOTIFY_SOCKET (a path, or '@name' in
the abstract namespace); a service of Type=notify sends "READY=1" there once it serves, and
"RELOADING=1" / "STOPPING=1" around a reload and a stop (sd_notify(3)). With no
$NOTIFY_SOCKET every notification is a no-op, so the same code runs anywhere.

Logging: under journald, stderr is a journal stream and systemd sets $JOURNAL_STREAM to its
"device:inode"; the journal stamps each line itself, so lines then carry no timestamp and
start with a "<N>" syslog priority prefix instead, which journald turns into the entry's
priority. Elsewhere lines carry a timestamp. `--log-file` appends to a file instead; calling
`configure_logging` again (on SIGHUP) reopens it, for logrotate.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

_PRIORITY = {  # logging level -> syslog priority (sd-daemon.h SD_ERR...SD_DEBUG)
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
TIMESTAMPED = "%(asctime)s %(name)s %(levelname)s %(message)s"


def sd_notify(state: str) -> bool:
    """Send `state` (newline-separated KEY=VALUE) to the service manager; False when there
    is none (no $NOTIFY_SOCKET). A manager that vanished is not our failure: ignored."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError:
        return False
    return True


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def under_journald(stream: TextIO) -> bool:
    """Whether `stream` is the journal stream systemd described in $JOURNAL_STREAM."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = expected.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class JournalFormatter(logging.Formatter):
    """'<6>prism.server: message': priority for journald, no timestamp (it adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{super().format(record)}"


_installed: list[logging.Handler] = []


def configure_logging(level: str, log_file: str | None) -> None:
    """Route the root logger to `log_file` (reopened on every call) or stderr, at `level`.
    Replaces the handler a previous call installed, so this is also the reload."""
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(Path(log_file), encoding="utf-8")
        handler.setFormatter(logging.Formatter(TIMESTAMPED))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            JournalFormatter() if under_journald(sys.stderr) else logging.Formatter(TIMESTAMPED)
        )
    root = logging.getLogger()
    for old in _installed:  # after the new one opened: a failed reopen keeps the old
        root.removeHandler(old)
        old.close()
    _installed[:] = [handler]
    root.addHandler(handler)
    root.setLevel(level.upper())
