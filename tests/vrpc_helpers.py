"""Helpers for the VRPC tests: both ring backends, and a channel's two ends in one process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from vrpc import abi
from vrpc.native import NATIVE_AVAILABLE, backend
from vrpc.ring import ClientRing, Segment, ServerRing, eventfd, map_segment, new_segment

NATIVE_REQUIRED = os.environ.get("PRISM_REQUIRE_NATIVE") == "1"
_skip_native = pytest.mark.skipif(
    not NATIVE_AVAILABLE and not NATIVE_REQUIRED,
    reason="vrpc._native is not built (no compiler at install time)",
)
BACKENDS = [pytest.param("native", marks=_skip_native), "python"]
PAIRS = [
    pytest.param(s, c, marks=_skip_native if "native" in (s, c) else (), id=f"srv_{s}-cli_{c}")
    for s in ("native", "python")
    for c in ("native", "python")
]


@dataclass
class Channel:
    """Both ends of one ring in this process; the client maps the memfd on its own."""

    segment: Segment
    client_map: object
    kick: int
    call: int
    server: ServerRing
    client: ClientRing


@contextmanager
def channel(
    server_backend: str,
    client_backend: str,
    *,
    nslots: int = 4,
    entries: int = 0,
    first_index: int = 0,
    doorbell: int = abi.DOORBELL_EVENTFD,
) -> Iterator[Channel]:
    segment = new_segment(nslots)
    kick, call = eventfd(), eventfd()
    server = backend(server_backend).server(
        segment.map,
        nslots=nslots,
        entries=entries,
        doorbell=doorbell,
        call_fd=call,
        first_index=first_index,
        boot_id=0xB007,
        channel_id=42,
    )
    client_map = map_segment(segment.fd)
    client = backend(client_backend).client(client_map, kick_fd=kick, call_fd=call)
    try:
        yield Channel(segment, client_map, kick, call, server, client)
    finally:
        client.release()
        server.release()
        client_map.close()
        segment.close()
        os.close(kick)
        os.close(call)
