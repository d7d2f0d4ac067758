"""`prism serve`: MOUNT, NFS and file locking (NLM, NSM) over TCP and UDP, plus portmapper
registration, and VRPC (shared-memory channels for local clients, `vrpc.server`) on a Unix
control socket, `DATA/vrpc.sock` unless `--vrpc PATH` or `--no-vrpc`.

Start-up: open the store and its executor (store calls run inline on the event loop, with
group commit), build one RPC dispatcher carrying the NFS and MOUNT programs, and listen with
it on the NFS and MOUNT ports over TCP and UDP. The lock programs (`prism.nlm`: NLM v1/v3/v4
and NSM v1) go on the same dispatcher and listen on their own port too (`--nlm-port`, an
ephemeral one by default, as lockd's); their start moves the NSM state on and, after an
unclean history, opens the grace period (`--grace`). The TCP listeners share one connection
table (`rpc.transport.Connections`: total and per-address caps, stalled records) whose
policy is the service's `peer_bound`, so addresses bound to no VM go first. Then make the
ports discoverable: register with a system rpcbind if one answers on 127.0.0.1:111,
otherwise answer PMAP v2 ourselves on --portmap-port (or 111 when it can be bound).
Shutdown (SIGTERM/SIGINT): detach every VRPC channel (which wakes its client), stop
listening, commit pending work, unregister, close the store. SIGHUP goes to the caller's
`ServiceHooks.reload` (the CLI rereads its config there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prism.limits import READ_CACHE_MB
from prism.metrics import MetricSources, MetricsServer
from prism.nfs.const import MOUNT_PORT, MOUNT_PROGRAM, MOUNT_V3, NFS_PORT, NFS_PROGRAM, NFS_V3
from prism.nfs.replies import mount_status, nfs_status
from prism.nfs.service import NfsService
from prism.nlm.monitor import DEFAULT_GRACE, Monitor
from prism.nlm.service import NlmService
from prism.nlm.types import (
    NLM_PROGRAM,
    NLM_V1,
    NLM_V3,
    NLM_V4,
    NSM_PROGRAM,
    NSM_V1,
    nlm_status,
)
from prism.store import Store
from prism.store.executor import StoreExecutor
from rpc.admission import MAX_PER_ADDRESS, RECORD_TIMEOUT, ConnectionLimits
from rpc.client import RpcError
from rpc.portmap import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    PMAP_PORT,
    PMAP_PROG,
    PMAP_VERS,
    RPCBIND_SOCKET,
    PortMapping,
    PortmapProgram,
    pmap_getport,
    pmap_set,
    pmap_unset,
    rpcbind_answers,
)
from rpc.server import RpcDispatcher
from rpc.transport import (
    Connections,
    UdpServer,
    bound_port,
    connection_budget,
    serve_tcp,
    serve_udp,
)
from vrpc.control import MAX_CHANNELS
from vrpc.server import VrpcServer, default_socket

log = logging.getLogger("prism.server")

LOCK_PROGRAMS = (
    (NLM_PROGRAM, NLM_V4),
    (NLM_PROGRAM, NLM_V3),
    (NLM_PROGRAM, NLM_V1),
    (NSM_PROGRAM, NSM_V1),
)
PROGRAMS = ((NFS_PROGRAM, NFS_V3), (MOUNT_PROGRAM, MOUNT_V3), (MOUNT_PROGRAM, 1), *LOCK_PROGRAMS)


@dataclass(frozen=True)
class ServeOptions:
    data: Path
    bind: str = "0.0.0.0"
    nfs_port: int = NFS_PORT
    mount_port: int = MOUNT_PORT
    portmap_port: int | None = None
    portmap: bool = True
    metrics: str | None = None
    durable_replies: bool = True
    """False is `--async`: modifying calls are answered before their changes are durable."""
    max_connections: int | None = None
    """NFS and MOUNT TCP connections in all; None: what the file descriptor limit allows."""
    max_connections_per_address: int = MAX_PER_ADDRESS
    read_cache_mb: int = READ_CACHE_MB
    """MiB of verified chunks kept in memory for small reads (`--read-cache-mb`)."""
    record_timeout: float = RECORD_TIMEOUT
    """Seconds an incomplete record may go without new bytes before its connection closes."""
    nlm_port: int = 0
    """NLM and NSM (TCP and UDP); 0: an ephemeral port, found through the portmapper."""
    grace: float = DEFAULT_GRACE
    """Seconds after a restart during which only lock reclaims are granted."""
    vrpc: bool = True
    """Listen for VRPC channels (`--no-vrpc`: not)."""
    vrpc_socket: Path | None = None
    """The VRPC control socket (`--vrpc PATH`); None: DATA/vrpc.sock."""
    vrpc_max_channels: int = MAX_CHANNELS


class PrismServer:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.store = Store.open(
            options.data, journal=True, read_cache_bytes=options.read_cache_mb << 20
        )
        self.executor = StoreExecutor(self.store)
        self.service = NfsService(self.executor, durable_replies=options.durable_replies)
        self.dispatcher = RpcDispatcher()
        self.dispatcher.add_program(self.service.program(), nfs_status)
        self.dispatcher.add_program(self.service.mount_program(), mount_status)
        self.nlm = NlmService(self.service, Monitor(options.data), grace=options.grace)
        self.dispatcher.add_program(self.nlm.program(), nlm_status)
        self.dispatcher.add_program(self.nlm.nsm_program())
        self.connections = Connections(
            ConnectionLimits(
                options.max_connections or connection_budget(),
                options.max_connections_per_address,
                options.record_timeout,
            ),
            is_bound=self.service.peer_bound,
        )
        self._servers: list[asyncio.AbstractServer | UdpServer] = []
        self.vrpc: VrpcServer | None = None
        if options.vrpc:
            self.vrpc = VrpcServer(
                self.dispatcher,
                self.service,
                options.vrpc_socket or default_socket(options.data),
                data=options.data,
                max_channels=options.vrpc_max_channels,
            )
        self._registered_with_rpcbind = False
        self.nfs_port = self.mount_port = self.nlm_port = 0
        self.portmap_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics: MetricsServer | None = None

    async def start(self) -> None:
        self.executor.resume()
        bind = self.options.bind
        conns = self.connections
        nfs_tcp = await serve_tcp(self.dispatcher, bind, self.options.nfs_port, connections=conns)
        self.nfs_port = bound_port(nfs_tcp)
        nfs_udp = await serve_udp(self.dispatcher, bind, self.nfs_port)
        mount_tcp = await serve_tcp(
            self.dispatcher, bind, self.options.mount_port, connections=conns
        )
        self.mount_port = bound_port(mount_tcp)
        mount_udp = await serve_udp(self.dispatcher, bind, self.mount_port)
        nlm_tcp = await serve_tcp(self.dispatcher, bind, self.options.nlm_port, connections=conns)
        self.nlm_port = bound_port(nlm_tcp)
        nlm_udp = await serve_udp(self.dispatcher, bind, self.nlm_port)
        self._servers += [nfs_tcp, nfs_udp, mount_tcp, mount_udp, nlm_tcp, nlm_udp]
        await self.nlm.start()
        if self.vrpc is not None:
            await self.vrpc.start()
        if self.options.portmap:
            await self._start_portmap()
        if self.options.metrics:
            sources = MetricSources(
                self.executor,
                self.dispatcher.stats,
                self.service,
                self.connections.table,
                self.nlm.manager,
                self.nlm.stats,
                self.vrpc,
            )
            loop = asyncio.get_running_loop()
            self._metrics = MetricsServer(self.options.metrics, sources, loop)
            self.metrics_port = self._metrics.port

    def _mappings(self) -> list[PortMapping]:
        return [
            PortMapping(prog, vers, prot, port)
            for prog, vers, port in (
                (NFS_PROGRAM, NFS_V3, self.nfs_port),
                (MOUNT_PROGRAM, MOUNT_V3, self.mount_port),
                (MOUNT_PROGRAM, 1, self.mount_port),
                *((prog, vers, self.nlm_port) for prog, vers in LOCK_PROGRAMS),
            )
            for prot in (IPPROTO_TCP, IPPROTO_UDP)
        ]

    async def _start_portmap(self) -> None:
        if self.options.portmap_port is None and await asyncio.to_thread(rpcbind_answers):
            await asyncio.to_thread(self._register_with_rpcbind)
            return
        portmap = PortmapProgram()
        for mapping in self._mappings():
            portmap.set(mapping)
        portmap.set(PortMapping(PMAP_PROG, PMAP_VERS, IPPROTO_TCP, 0))
        dispatcher = RpcDispatcher()
        dispatcher.add_program(portmap.program)
        port = self.options.portmap_port or PMAP_PORT
        try:
            tcp = await serve_tcp(dispatcher, self.options.bind, port)
            port = bound_port(tcp)
            udp = await serve_udp(dispatcher, self.options.bind, port)
        except OSError as exc:
            log.warning(
                "portmapper not started: cannot bind port %d (%s); clients need explicit "
                "port= and mountport= options, or pass --portmap-port",
                port,
                exc.strerror,
            )
            return
        portmap.unset(PMAP_PROG, PMAP_VERS)
        for prot in (IPPROTO_TCP, IPPROTO_UDP):
            portmap.set(PortMapping(PMAP_PROG, PMAP_VERS, prot, port))
        self._servers += [tcp, udp]
        self.portmap_port = port

    def _rpcbind_call(self, fn: Any, *args: Any) -> Any:
        """Talk to the system rpcbind through its unix socket (it refuses SET over loopback
        TCP unless run insecure), falling back to TCP."""
        if os.path.exists(RPCBIND_SOCKET):
            with contextlib.suppress(OSError, RpcError):
                return fn(RPCBIND_SOCKET, *args, transport="unix")
        return fn("127.0.0.1", *args)

    def _register_with_rpcbind(self) -> None:
        for prog, vers in LOCK_PROGRAMS:
            with contextlib.suppress(OSError, RpcError):
                port = pmap_getport("127.0.0.1", prog, vers, IPPROTO_TCP)
                if port and port != self.nlm_port:
                    log.warning(
                        "replacing the rpcbind registration of program %d v%d (port %d): a "
                        "kernel lockd or rpc.statd on this host loses its clients to Prism",
                        prog,
                        vers,
                        port,
                    )
        for prog, vers in PROGRAMS:
            with contextlib.suppress(OSError, RpcError):
                self._rpcbind_call(pmap_unset, prog, vers)
        ok = True
        for mapping in self._mappings():
            try:
                ok = bool(self._rpcbind_call(pmap_set, mapping)) and ok
            except (OSError, RpcError):
                ok = False
        if not ok:
            log.warning(
                "the system rpcbind on 127.0.0.1:111 refused some registrations; clients "
                "need explicit port= and mountport= options"
            )
        self._registered_with_rpcbind = True
        self.portmap_port = PMAP_PORT

    async def stop(self) -> None:
        metrics_closed = (
            None if self._metrics is None else asyncio.create_task(self._metrics.close())
        )
        if self.vrpc is not None:
            await self.vrpc.stop()
        await self.nlm.stop()
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._registered_with_rpcbind:
            for prog, vers in PROGRAMS:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._rpcbind_call, pmap_unset, prog, vers)
        if metrics_closed is not None:  # no scrape reads the store once it closes
            await metrics_closed
        self.executor.flush()
        self.store.close()

    def ready_line(self) -> str:
        vms = len(self.store.list_namespaces("vm"))
        portmap = (
            "rpcbind"
            if self._registered_with_rpcbind
            else (f"portmap {self.portmap_port}" if self.portmap_port else "no portmap")
        )
        metrics = f", metrics :{self.metrics_port}" if self.metrics_port else ""
        vrpc = f"vrpc {self.vrpc.path}" if self.vrpc is not None else "no vrpc"
        return (
            f"prism: ready: {vms} VMs from {self.options.data}; nfs {self.options.bind}:"
            f"{self.nfs_port} mount {self.mount_port} nlm {self.nlm_port} (tcp+udp), "
            f"{vrpc}, {portmap}{metrics}"
        )


# glibc serves allocations above its mmap threshold (dynamic, 128 KiB to start) with fresh
# mmap()ed pages and returns the heap's free top to the kernel above the trim threshold.
# Every 1 MiB WRITE or READ record then costs ~500 page faults (each buffer is touched on
# fresh pages twice), which measured as half the server's CPU time on sequential writes.
# Keeping records up to the largest RPC record on the heap, and not trimming below 256 MiB,
# lets freed buffers be reused.
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for this setting on 64-bit
_TRIM_THRESHOLD = 256 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_large_buffers_on_heap() -> bool:
    """Tune glibc malloc for 1 MiB records (see above). False where there is no glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the server's loop on uvloop when it is installed (libuv's loop handles each
    request in a fraction of the Python work asyncio's selector loop does), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


class ServiceHooks(Protocol):
    """What a service manager hears: ready (with the ready line), SIGHUP, stopping."""

    def ready(self, status: str) -> None: ...
    def reload(self) -> None: ...
    def stopping(self) -> None: ...


async def serve(options: ServeOptions, hooks: ServiceHooks | None = None) -> None:
    if not keep_large_buffers_on_heap():
        log.debug("no glibc mallopt: large buffers stay on the default allocator policy")
    server = PrismServer(options)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if hooks is not None:
        loop.add_signal_handler(signal.SIGHUP, hooks.reload)
    ready = server.ready_line()
    print(ready, flush=True)
    if hooks is not None:
        hooks.ready(ready)
    await stop.wait()
    log.info("stopping")
    if hooks is not None:
        hooks.stopping()
    await server.stop()
    print("prism: stopped cleanly", flush=True)
