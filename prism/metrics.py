"""Prometheus text-format metrics for `prism serve --metrics ADDR:PORT`.

A tiny HTTP/1.0 responder (GET /metrics only) on the server's event loop. Figures: per-VM
logical bytes, objects and quota; store logical and stored bytes, dedup ratio, chunk count and
reads refused because content failed its hash check; per-procedure RPC call counts, errors
and latency sums from the dispatcher; the TCP connections open, refused, evicted and closed
as stalled (`rpc.admission`); the file locks (`prism.nlm`): held, waiting, clients,
blocked requests granted and their waits; and VRPC (`vrpc.server`): channels, calls by path
(python, and fast for the C fast path), protocol errors, refused and revoked attachments.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prism.store import Store

if TYPE_CHECKING:
    from prism.nlm.locks import LockManager
    from prism.nlm.service import NlmStats
    from prism.store.executor import StoreExecutor
    from rpc.admission import ConnectionTable
    from rpc.server import DispatcherStats
    from vrpc.server import VrpcServer


@dataclass(frozen=True, slots=True)
class MetricSources:
    """What the endpoint reads, handed in by whoever serves it: the store only through its
    executor (one call per scrape), the rest as live counters read without locks."""

    executor: StoreExecutor
    rpc: DispatcherStats
    connections: ConnectionTable[Any]
    locks: LockManager
    lock_stats: NlmStats
    vrpc: VrpcServer | None


def parse_listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics wants ADDR:PORT (e.g. 127.0.0.1:9100), got {spec!r}")
    return host or "0.0.0.0", int(port)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _single_samples(*rows: tuple[str, str, str, object]) -> list[str]:
    """The lines of metrics that have one sample without labels: rows of (name, type, help
    text, value)."""
    lines: list[str] = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return lines


def collect_store(store: Store) -> list[str]:
    lines = [
        "# HELP prism_vm_logical_bytes Logical bytes stored in the VM's files.",
        "# TYPE prism_vm_logical_bytes gauge",
    ]
    vms = store.list_namespaces("vm")
    usages = {vm.name: store.usage(vm.name) for vm in vms}
    lines += [
        f'prism_vm_logical_bytes{{vm="{_label(n)}"}} {u.logical_bytes}' for n, u in usages.items()
    ]
    lines += ["# HELP prism_vm_files Objects in the VM.", "# TYPE prism_vm_files gauge"]
    lines += [f'prism_vm_files{{vm="{_label(n)}"}} {u.files}' for n, u in usages.items()]
    lines += [
        "# HELP prism_vm_quota_bytes Quota (absent: none).",
        "# TYPE prism_vm_quota_bytes gauge",
    ]
    lines += [
        f'prism_vm_quota_bytes{{vm="{_label(vm.name)}"}} {vm.quota}'
        for vm in vms
        if vm.quota is not None
    ]
    st = store.stats()
    lines += _single_samples(
        ("prism_store_logical_bytes", "gauge", "Logical bytes over all VMs.", st.logical_bytes),
        ("prism_store_stored_bytes", "gauge", "Distinct chunk bytes referenced.", st.stored_bytes),
        ("prism_store_chunks", "gauge", "Distinct chunks referenced.", st.chunk_count),
        ("prism_store_dedup_ratio", "gauge", "Logical / stored bytes.", round(st.dedup_ratio, 4)),
        (
            "prism_store_damaged_reads_total",
            "counter",
            "Reads refused (NFS3ERR_IO) because content failed its hash check.",
            store.damaged_reads,
        ),
    )
    return lines


RPC_SERIES = (
    ("prism_rpc_calls_total", "counter", "RPC calls by program and procedure.", "calls"),
    ("prism_rpc_errors_total", "counter", "Replies other than SUCCESS.", "errors"),
    ("prism_rpc_latency_seconds_sum", "counter", "Sum of handler latencies.", "seconds"),
    ("prism_rpc_latency_seconds_max", "gauge", "Slowest call.", "max_seconds"),
)


def collect_rpc(stats: DispatcherStats) -> list[str]:
    rows = sorted(stats.procs.items())
    lines: list[str] = []
    for name, kind, help_text, field in RPC_SERIES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for (_prog, vers, _proc), ps in rows:
            labels = f'program="{ps.program}",version="{vers}",proc="{ps.name}"'
            value = getattr(ps, field)
            shown = f"{value:.6f}" if isinstance(value, float) else str(value)
            lines.append(f"{name}{{{labels}}} {shown}")
    return lines


def collect_connections(table: ConnectionTable[Any]) -> list[str]:
    return _single_samples(
        ("prism_connections_open", "gauge", "NFS and MOUNT TCP connections open.", len(table)),
        (
            "prism_connections_refused_total",
            "counter",
            "Connections closed at once: over the total or per-address cap.",
            table.refused,
        ),
        (
            "prism_connections_evicted_total",
            "counter",
            "Connections from addresses bound to no VM closed to make room.",
            table.evicted,
        ),
        (
            "prism_connections_stalled_total",
            "counter",
            "Connections closed after --record-timeout with a half-sent request.",
            table.expired_count,
        ),
    )


def collect_locks(m: LockManager, st: NlmStats) -> list[str]:
    return _single_samples(
        ("prism_locks_held", "gauge", "Byte-range locks held.", sum(1 for _ in m.locks())),
        (
            "prism_locks_waiting",
            "gauge",
            "Blocked lock requests queued.",
            sum(1 for _ in m.waiters()),
        ),
        ("prism_lock_shares_held", "gauge", "Share reservations held.", sum(1 for _ in m.shares())),
        ("prism_lock_clients", "gauge", "Clients holding or waiting for locks.", len(m.clients())),
        (
            "prism_lock_waits_granted_total",
            "counter",
            "Blocked lock requests granted later.",
            st.waits_granted,
        ),
        (
            "prism_lock_wait_seconds_total",
            "counter",
            "Seconds blocked requests waited before their grant.",
            round(st.wait_seconds, 6),
        ),
        (
            "prism_lock_callbacks_failed_total",
            "counter",
            "Calls to clients (GRANTED, results, SM_NOTIFY) given up after retries.",
            st.callbacks_failed,
        ),
        (
            "prism_lock_grace_refused_total",
            "counter",
            "New locks refused during the grace period after a restart.",
            st.grace_refused,
        ),
    )


def collect_vrpc(vrpc: VrpcServer | None) -> list[str]:
    if vrpc is None:
        return []
    st = vrpc.stats
    lines = [
        "# HELP prism_vrpc_calls_total VRPC calls, by where they were answered.",
        "# TYPE prism_vrpc_calls_total counter",
        f'prism_vrpc_calls_total{{path="python"}} {st.calls}',
        f'prism_vrpc_calls_total{{path="fast"}} {st.fast_path_hits}',
    ]
    return lines + _single_samples(
        ("prism_vrpc_channels", "gauge", "VRPC channels attached.", vrpc.open_channels),
        (
            "prism_vrpc_protocol_errors_total",
            "counter",
            "VRPC channels closed because their client broke the ring protocol.",
            st.protocol_errors,
        ),
        ("prism_vrpc_attach_refused_total", "counter", "VRPC ATTACHes refused.", st.refused),
        (
            "prism_vrpc_revoked_total",
            "counter",
            "VRPC channels detached after their VM's principals or token changed.",
            st.revoked,
        ),
    )


async def serve_metrics(spec: str, sources: MetricSources) -> tuple[asyncio.AbstractServer, int]:
    host, port = parse_listen(spec)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass
            parts = request.decode("latin-1").split()
            if len(parts) < 2 or parts[0] != "GET" or parts[1].split("?")[0] != "/metrics":
                body, status = b"only GET /metrics is served\n", "404 Not Found"
            else:
                lines = await sources.executor.call(collect_store)
                lines += collect_rpc(sources.rpc) + collect_connections(sources.connections)
                lines += collect_locks(sources.locks, sources.lock_stats)
                lines += collect_vrpc(sources.vrpc)
                body, status = ("\n".join(lines) + "\n").encode(), "200 OK"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, host, port)
    return srv, int(srv.sockets[0].getsockname()[1])
