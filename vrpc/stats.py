"""VRPC counters, and the file through which `prism stats` reads a running server's.

The server (`vrpc.server`) keeps one `VrpcStats`; the metrics endpoint reads it directly, and
`publish` writes it with the channel count and the server's pid to `DATA/vrpc-stats.json`
(replaced whole, owner-only, not fsync'd: figures, not state) at most once a second while
they change, and removes the file at a clean stop. `read_stats(DATA)` is the other side:
None when no live server wrote it (no file, or its pid is gone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATS_FILE = "vrpc-stats.json"


@dataclass(slots=True)
class VrpcStats:
    calls: int = 0  # records dispatched through Python (`RpcDispatcher.handle_now`)
    fast_path_hits: int = 0  # records answered in C (none until the C fast path exists)
    protocol_errors: int = 0  # channels closed because their client broke the protocol
    attached: int = 0  # ATTACHes granted
    refused: int = 0  # ATTACHes refused
    revoked: int = 0  # channels detached: their peer lost the right to the VM


def snapshot(stats: VrpcStats, channels: int) -> dict[str, Any]:
    return {"pid": os.getpid(), "channels": channels, **dataclasses.asdict(stats)}


def publish(data: Path, figures: dict[str, Any]) -> None:
    path = Path(data) / STATS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(figures, sort_keys=True).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def unpublish(data: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(data) / STATS_FILE).unlink()


def read_stats(data: Path) -> dict[str, Any] | None:
    """The running server's VRPC figures, or None if no server runs VRPC on `data`."""
    try:
        figures: dict[str, Any] = json.loads((Path(data) / STATS_FILE).read_bytes())
        os.kill(int(figures["pid"]), 0)
    except (FileNotFoundError, ProcessLookupError, ValueError, KeyError, TypeError):
        return None
    return figures
