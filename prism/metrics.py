"""Prometheus metrics for `prism serve --metrics [ADDR]:PORT`, served by `prometheus_client`.

Theory of operation: the hot path only adds to plain counters kept by their owners (the
dispatcher's `ProcStats`, with a latency histogram per procedure, `rpc.latency`; the NFS
service's per-VM `VmStats`; the executor's durable-point and checkpoint histograms; the
connection table; NLM; VRPC) and takes no lock. `PrismCollector` reads them only when
scraped: prometheus_client's HTTP server answers on its own threads, and `collect` hands one
task to the event loop that reads every figure there (the store through its executor, one
call per scrape; the counters on the thread that writes them, so every copy is consistent)
and builds the metric families; the thread then encodes them. `FAMILIES` is the table of
every metric Prism exposes (name, type, help, labels); the README documents each, and
`tests/test_metrics.py` holds the two to each other.

prometheus_client maintains the rest: the exposition formats and their negotiation (text
0.0.4, or OpenMetrics when the scraper asks for it), gzip, `?name[]=` filters, histogram
semantics, and the process (`process_*`), platform (`python_info`) and garbage collector
(`python_gc_*`) metrics. Only GET /metrics is served; every other path is 404, and a scrape
the event loop does not answer within SCRAPE_TIMEOUT seconds is 503.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from prism.nfs.const import Nfs3Proc
from prism.store import Store
from rpc.latency import Latencies

if TYPE_CHECKING:
    from prism.nfs.service import NfsService, VmStats
    from prism.nlm.locks import LockManager
    from prism.nlm.service import NlmStats
    from prism.store.executor import StoreExecutor
    from rpc.admission import ConnectionTable
    from rpc.server import DispatcherStats
    from vrpc.server import VrpcServer

log = logging.getLogger("prism.metrics")

SCRAPE_TIMEOUT = 10.0
"""Seconds a scrape waits for the event loop to read the figures (the loop may be inside a
long store call) before it is answered 503."""
IDLE_TIMEOUT = 10.0
"""Seconds a metrics connection may send nothing before it is closed."""


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name as scraped (counters end in _total), its Prometheus type, its
    help text and its labels."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()


RPC_LABELS = ("program", "version", "proc")

FAMILIES = (
    # -- VMs and the store (read through the executor) -------------------------------------
    Family("prism_vm_logical_bytes", "gauge", "Logical bytes stored in the VM's files.", ("vm",)),
    Family("prism_vm_files", "gauge", "Objects in the VM.", ("vm",)),
    Family("prism_vm_quota_bytes", "gauge", "The VM's quota (absent: none).", ("vm",)),
    Family(
        "prism_vm_calls_total",
        "counter",
        "NFS calls admitted to the VM, by procedure (the VRPC fast path's included).",
        ("vm", "proc"),
    ),
    Family("prism_vm_read_bytes_total", "counter", "Bytes READ returned from the VM.", ("vm",)),
    Family("prism_vm_written_bytes_total", "counter", "Bytes WRITE accepted into the VM.", ("vm",)),
    Family("prism_store_logical_bytes", "gauge", "Logical bytes over all VMs."),
    Family("prism_store_stored_bytes", "gauge", "Distinct chunk bytes referenced."),
    Family("prism_store_chunks", "gauge", "Distinct chunks referenced."),
    Family("prism_store_dedup_ratio", "gauge", "Logical / stored bytes."),
    Family(
        "prism_store_dedup_bytes",
        "gauge",
        "Bytes saved by identical content written independently (referenced - stored).",
    ),
    Family(
        "prism_store_clone_shared_bytes",
        "gauge",
        "Bytes shared by clones and snapshots (logical - referenced; holes included).",
    ),
    Family(
        "prism_store_segment_bytes",
        "gauge",
        "Bytes in segment files, garbage included (`prism gc` returns the garbage).",
    ),
    Family(
        "prism_store_free_bytes",
        "gauge",
        "Bytes the data directory's filesystem has free for unprivileged writers.",
    ),
    Family(
        "prism_store_damaged_reads_total",
        "counter",
        "Reads refused (NFS3ERR_IO) because content failed its hash check.",
    ),
    Family(
        "prism_journal_flush_seconds",
        "histogram",
        "Durable points: the journal append and fdatasync (content first) that durable"
        " replies wait for.",
    ),
    Family(
        "prism_store_checkpoint_seconds",
        "histogram",
        "Checkpoints: commits of the open batch to LMDB, which retire the journal's records.",
    ),
    Family(
        "prism_store_write_lock_waits_total",
        "counter",
        "Polls for the store's write lock while an operator command held it.",
    ),
    # -- RPC (the dispatcher) --------------------------------------------------------------
    Family("prism_rpc_calls_total", "counter", "RPC calls by program and procedure.", RPC_LABELS),
    Family(
        "prism_rpc_errors_total",
        "counter",
        "Replies other than OK by status: the protocol's (NFS3ERR_NOENT, MNT3ERR_ACCES,"
        " DENIED...) or the RPC layer's (GARBAGE_ARGS, SYSTEM_ERR, AUTH_ERROR, DROPPED).",
        (*RPC_LABELS, "status"),
    ),
    Family(
        "prism_rpc_latency_seconds",
        "histogram",
        "Handler latency by procedure: from the handler's start to its encoded reply.",
        RPC_LABELS,
    ),
    Family(
        "prism_rpc_outcomes_total",
        "counter",
        "Records by outcome: SUCCESS, an RPC-level failure (GARBAGE_ARGS, PROC_UNAVAIL,"
        " AUTH_ERROR, UNDECODABLE...), or DRC_HIT/DRC_IN_PROGRESS for retransmissions.",
        ("outcome",),
    ),
    # -- connections (rpc.admission) -------------------------------------------------------
    Family("prism_connections_open", "gauge", "NFS, MOUNT and NLM TCP connections open."),
    Family(
        "prism_connections_refused_total",
        "counter",
        "Connections closed at once: over the total or per-address cap.",
    ),
    Family(
        "prism_connections_evicted_total",
        "counter",
        "Connections from addresses bound to no VM closed to make room.",
    ),
    Family(
        "prism_connections_stalled_total",
        "counter",
        "Connections closed after --record-timeout with a half-sent request.",
    ),
    # -- file locks (prism.nlm) ------------------------------------------------------------
    Family("prism_locks_held", "gauge", "Byte-range locks held."),
    Family("prism_locks_waiting", "gauge", "Blocked lock requests queued."),
    Family("prism_lock_shares_held", "gauge", "Share reservations held."),
    Family("prism_lock_clients", "gauge", "Clients holding or waiting for locks."),
    Family("prism_lock_waits_granted_total", "counter", "Blocked lock requests granted later."),
    Family(
        "prism_lock_wait_seconds_total",
        "counter",
        "Seconds blocked requests waited before their grant.",
    ),
    Family(
        "prism_lock_callbacks_failed_total",
        "counter",
        "Calls to clients (GRANTED, results, SM_NOTIFY) given up after retries.",
    ),
    Family(
        "prism_lock_grace_refused_total",
        "counter",
        "New locks refused during the grace period after a restart.",
    ),
    # -- VRPC (vrpc.server; absent with --no-vrpc) -----------------------------------------
    Family(
        "prism_vrpc_calls_total",
        "counter",
        "VRPC calls, by where they were answered (python, or fast: the C fast path).",
        ("path",),
    ),
    Family("prism_vrpc_channels", "gauge", "VRPC channels attached."),
    Family(
        "prism_vrpc_protocol_errors_total",
        "counter",
        "VRPC channels closed because their client broke the ring protocol.",
    ),
    Family("prism_vrpc_attached_total", "counter", "VRPC ATTACHes granted."),
    Family("prism_vrpc_attach_refused_total", "counter", "VRPC ATTACHes refused."),
    Family(
        "prism_vrpc_revoked_total",
        "counter",
        "VRPC channels detached after their VM's principals or token changed.",
    ),
)
BY_NAME = {f.name: f for f in FAMILIES}


def parse_listen(spec: str) -> tuple[str, int]:
    """ADDR:PORT -> (address, port): an empty ADDR is every address, [v6]:PORT an IPv6 one."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics wants [ADDR]:PORT (e.g. 127.0.0.1:9100), got {spec!r}")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


@dataclass(frozen=True, slots=True)
class MetricSources:
    """What the endpoint reads, handed in by whoever serves it: the store only through its
    executor (one call per scrape), the rest as live counters read on the event loop."""

    executor: StoreExecutor
    rpc: DispatcherStats
    nfs: NfsService
    connections: ConnectionTable[Any]
    locks: LockManager
    lock_stats: NlmStats
    vrpc: VrpcServer | None


class Families:
    """The metric families of one scrape, made from `FAMILIES` as they are first used."""

    def __init__(self) -> None:
        self.made: dict[str, Metric] = {}

    def family(self, name: str) -> Any:
        family = self.made.get(name)
        if family is None:
            family = self.made[name] = empty(BY_NAME[name])
        return family

    def declare(self, *names: str) -> None:
        """Show these families even when they have no sample yet."""
        for name in names:
            self.family(name)

    def add(self, name: str, value: float, *labels: str) -> None:
        self.family(name).add_metric(list(labels), value)

    def histogram(self, name: str, latencies: Latencies, *labels: str) -> None:
        buckets = [(floatToGoString(le), n) for le, n in latencies.cumulative()]
        self.family(name).add_metric(list(labels), buckets, latencies.seconds)


def empty(family: Family) -> Metric:
    kinds: dict[str, Callable[..., Metric]] = {
        "counter": CounterMetricFamily,
        "gauge": GaugeMetricFamily,
        "histogram": HistogramMetricFamily,
    }
    return kinds[family.kind](family.name, family.help, labels=family.labels)


def store_figures(store: Store, out: Families, vm_stats: dict[int, VmStats]) -> None:
    """The VMs' and the store's figures (runs in the executor: one store call), with the
    NFS service's per-VM counters, which are kept by VM id and shown by VM name."""
    out.declare(
        "prism_vm_logical_bytes", "prism_vm_files", "prism_vm_quota_bytes", "prism_vm_calls_total"
    )
    for vm in store.list_namespaces("vm"):
        usage = store.usage(vm.name)
        out.add("prism_vm_logical_bytes", usage.logical_bytes, vm.name)
        out.add("prism_vm_files", usage.files, vm.name)
        if vm.quota is not None:
            out.add("prism_vm_quota_bytes", vm.quota, vm.name)
        counts = vm_stats.get(vm.id)
        read = written = 0
        if counts is not None:
            read, written = counts.read_bytes, counts.written_bytes
            for proc, n in enumerate(counts.calls):
                if n:
                    out.add("prism_vm_calls_total", n, vm.name, Nfs3Proc(proc).name)
        out.add("prism_vm_read_bytes_total", read, vm.name)
        out.add("prism_vm_written_bytes_total", written, vm.name)
    st = store.stats()
    out.add("prism_store_logical_bytes", st.logical_bytes)
    out.add("prism_store_stored_bytes", st.stored_bytes)
    out.add("prism_store_chunks", st.chunk_count)
    out.add("prism_store_dedup_ratio", st.dedup_ratio)
    out.add("prism_store_dedup_bytes", st.dedup_bytes)
    out.add("prism_store_clone_shared_bytes", st.clone_shared_bytes)
    out.add("prism_store_segment_bytes", st.segment_bytes)
    fs = os.statvfs(store.path)
    out.add("prism_store_free_bytes", fs.f_bavail * fs.f_frsize)
    out.add("prism_store_damaged_reads_total", store.damaged_reads)


def executor_figures(executor: StoreExecutor, out: Families) -> None:
    out.histogram("prism_journal_flush_seconds", executor.flushes)
    out.histogram("prism_store_checkpoint_seconds", executor.checkpoints)
    out.add("prism_store_write_lock_waits_total", executor.lock_waits)


def rpc_figures(stats: DispatcherStats, out: Families) -> None:
    out.declare("prism_rpc_calls_total", "prism_rpc_errors_total", "prism_rpc_latency_seconds")
    for (_prog, vers, _proc), ps in sorted(stats.procs.items()):
        labels = (ps.program, str(vers), ps.name)
        out.add("prism_rpc_calls_total", ps.calls, *labels)
        for status, count in sorted(ps.errors.items()):
            out.add("prism_rpc_errors_total", count, *labels, status)
        out.histogram("prism_rpc_latency_seconds", ps.latency, *labels)
    out.declare("prism_rpc_outcomes_total")
    for outcome, count in sorted(stats.outcomes.items()):
        out.add("prism_rpc_outcomes_total", count, outcome)


def connection_figures(table: ConnectionTable[Any], out: Families) -> None:
    out.add("prism_connections_open", len(table))
    out.add("prism_connections_refused_total", table.refused)
    out.add("prism_connections_evicted_total", table.evicted)
    out.add("prism_connections_stalled_total", table.expired_count)


def lock_figures(m: LockManager, st: NlmStats, out: Families) -> None:
    out.add("prism_locks_held", sum(1 for _ in m.locks()))
    out.add("prism_locks_waiting", sum(1 for _ in m.waiters()))
    out.add("prism_lock_shares_held", sum(1 for _ in m.shares()))
    out.add("prism_lock_clients", len(m.clients()))
    out.add("prism_lock_waits_granted_total", st.waits_granted)
    out.add("prism_lock_wait_seconds_total", st.wait_seconds)
    out.add("prism_lock_callbacks_failed_total", st.callbacks_failed)
    out.add("prism_lock_grace_refused_total", st.grace_refused)


def vrpc_figures(vrpc: VrpcServer | None, out: Families) -> None:
    if vrpc is None:
        return
    st = vrpc.stats
    out.add("prism_vrpc_calls_total", st.calls, "python")
    out.add("prism_vrpc_calls_total", st.fast_path_hits, "fast")
    out.add("prism_vrpc_channels", vrpc.open_channels)
    out.add("prism_vrpc_protocol_errors_total", st.protocol_errors)
    out.add("prism_vrpc_attached_total", st.attached)
    out.add("prism_vrpc_attach_refused_total", st.refused)
    out.add("prism_vrpc_revoked_total", st.revoked)


class ScrapeFailed(Exception):
    """The event loop did not hand over the figures in time."""


class PrismCollector:
    """prometheus_client's view of a running server (see the module docstring): `collect`
    runs on an HTTP thread and waits for the figures `gather` reads on the event loop."""

    def __init__(self, sources: MetricSources, loop: asyncio.AbstractEventLoop) -> None:
        self.sources = sources
        self.loop = loop

    def describe(self) -> list[Metric]:
        """Every family, empty: the registry learns the names without a scrape."""
        return [empty(f) for f in FAMILIES]

    def collect(self) -> Iterable[Metric]:
        future = asyncio.run_coroutine_threadsafe(self.gather(), self.loop)
        try:
            return future.result(SCRAPE_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise ScrapeFailed(
                f"the server's event loop did not answer within {SCRAPE_TIMEOUT:g} s"
            ) from None

    async def gather(self) -> list[Metric]:
        """Every figure, read on the event loop (the thread that writes them)."""
        src, out = self.sources, Families()
        await src.executor.call(lambda store: store_figures(store, out, src.nfs.vm_stats))
        executor_figures(src.executor, out)
        rpc_figures(src.rpc, out)
        connection_figures(src.connections, out)
        lock_figures(src.locks, src.lock_stats, out)
        vrpc_figures(src.vrpc, out)
        return list(out.made.values())


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def metrics_app(registry: CollectorRegistry) -> WsgiApp:
    """prometheus_client's WSGI app on /metrics only; 503 when the figures do not come."""
    serve = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"only GET /metrics is served\n"]
        try:
            return serve(environ, start_response)  # type: ignore[no-any-return]
        except ScrapeFailed as exc:
            log.warning("metrics scrape failed: %s", exc)
            status, text = "503 Service Unavailable", f"{exc}; try again"
        except Exception as exc:
            log.exception("metrics scrape failed")
            status, text = "500 Internal Server Error", f"reading the figures failed: {exc!r}"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{text}\n".encode()]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds up the server's exit


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """The HTTP endpoint on its own thread; `close` stops it."""

    def __init__(self, spec: str, sources: MetricSources, loop: asyncio.AbstractEventLoop):
        host, port = parse_listen(spec)
        self.registry = CollectorRegistry()
        self.registry.register(PrismCollector(sources, loop))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        server = _ThreadingServer6 if ":" in host else _ThreadingServer
        self.httpd = make_server(
            host, port, metrics_app(self.registry), server, handler_class=_QuietHandler
        )
        self.port: int = self.httpd.server_port
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="prism-metrics", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.httpd.shutdown)
        self.httpd.server_close()
