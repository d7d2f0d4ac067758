"""A guest's lock stack, stood in for by Python inside a network-namespace test host.

Theory of operation: `LockClientHost(host, server)` gives a `tests.netns` host what a Linux
guest runs for NFS locking: a portmapper on the namespace's own port 111, an NLM service
that accepts the server's GRANTED callbacks, and a status monitor (NSM) that records the
server's SM_NOTIFY after a restart. They run on an event loop in a thread that entered the
namespace (setns(2) changes the network namespace of the calling thread only), and every
client socket (NLM, NSM, MOUNT, NFS) is created by a second thread that entered it too, so
the server sees the namespace's address on each. Sockets keep their namespace, so the test
uses the clients from its own thread afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nlm.client import NlmClient, NsmClient
from prism.nlm.types import (
    NLM_PROGRAM,
    NSM_PROGRAM,
    NSM_V1,
    NlmProc,
    NlmStat,
    NsmProc,
    Res,
    StatChge,
    TestArgs,
    decode,
    encode,
)
from rpc.portmap import IPPROTO_TCP, IPPROTO_UDP, PortMapping, PortmapProgram
from rpc.server import NULL_PROCEDURE, CallContext, Procedure, Program, RpcDispatcher
from rpc.transport import UdpServer, bound_port, serve_tcp, serve_udp
from tests.netns import NamespaceHost

T = TypeVar("T")
CLONE_NEWNET = 0x4000_0000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name`."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class LockClientHost:
    def __init__(self, host: NamespaceHost, nfs_port: int, mount_port: int, nlm_port: int):
        self.host = host
        self.address = host.address
        self.ports = (nfs_port, mount_port, nlm_port)
        self.granted: list[TestArgs] = []
        self.notified: list[StatChge] = []
        self.results: list[tuple[NlmProc, bytes]] = []  # _RES calls: (procedure, args)
        self.answer = NlmStat.GRANTED
        self._cond = threading.Condition()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, initializer=enter_netns, initargs=(host.name,)
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._servers: list[asyncio.AbstractServer | UdpServer] = []
        self._opened: list[Any] = []

    def _run(self) -> None:
        enter_netns(self.host.name)
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> LockClientHost:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        return self

    async def _serve(self) -> None:
        portmap = PortmapProgram()
        pm = RpcDispatcher()
        pm.add_program(portmap.program)
        self._servers += [await serve_tcp(pm, "0.0.0.0", 111), await serve_udp(pm, "0.0.0.0", 111)]
        callbacks = RpcDispatcher()
        nlm = {
            0: NULL_PROCEDURE,
            int(NlmProc.GRANTED): Procedure(int(NlmProc.GRANTED), "GRANTED", self._granted),
        }
        for proc in (NlmProc.TEST_RES, NlmProc.LOCK_RES, NlmProc.CANCEL_RES, NlmProc.UNLOCK_RES):
            nlm[int(proc)] = Procedure(int(proc), proc.name, self._result)
        callbacks.add_program(Program(NLM_PROGRAM, "nlm", {1: nlm, 3: nlm, 4: nlm}))
        nsm = {
            0: NULL_PROCEDURE,
            int(NsmProc.NOTIFY): Procedure(int(NsmProc.NOTIFY), "NOTIFY", self._notify),
        }
        callbacks.add_program(Program(NSM_PROGRAM, "status", {NSM_V1: nsm}))
        tcp = await serve_tcp(callbacks, "0.0.0.0", 0)
        port = bound_port(tcp)
        self._servers += [tcp, await serve_udp(callbacks, "0.0.0.0", port)]
        for prog, vers in ((NLM_PROGRAM, 1), (NLM_PROGRAM, 3), (NLM_PROGRAM, 4), (NSM_PROGRAM, 1)):
            for prot in (IPPROTO_TCP, IPPROTO_UDP):
                portmap.set(PortMapping(prog, vers, prot, port))

    async def _granted(self, ctx: CallContext, data: bytes) -> bytes:
        args = decode(TestArgs, data, ctx.vers == 4)
        with self._cond:
            self.granted.append(args)
            self._cond.notify_all()
        return encode(Res(args.cookie, self.answer), ctx.vers == 4)

    async def _result(self, ctx: CallContext, data: bytes) -> bytes:
        with self._cond:
            self.results.append((NlmProc(ctx.proc), data))
            self._cond.notify_all()
        return b""

    async def _notify(self, ctx: CallContext, data: bytes) -> bytes:
        with self._cond:
            self.notified.append(decode(StatChge, data))
            self._cond.notify_all()
        return b""

    def wait_for(self, what: Callable[[], bool], timeout: float = 15.0) -> float:
        """Wait until `what()` holds; the seconds it took."""
        start = time.monotonic()
        with self._cond:
            if not self._cond.wait_for(what, timeout):
                raise AssertionError(f"{self.address}: condition not met in {timeout} s")
        return time.monotonic() - start

    def inside(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a thread inside the namespace (sockets it makes stay there)."""
        return self._pool.submit(fn).result(30)

    def nlm(self, vers: int = 4, transport: str = "tcp") -> NlmClient:
        nlm_port = self.ports[2]
        client = self.inside(
            lambda: NlmClient(
                self.host.gateway, nlm_port, transport, vers=vers, caller_name=self.host.name
            )
        )
        self._opened.append(client)
        return client

    def nsm(self) -> NsmClient:
        client = self.inside(lambda: NsmClient(self.host.gateway, self.ports[2]))
        self._opened.append(client)
        return client

    def handle(self, export: str, path: str) -> bytes:
        """The NFS handle of `path` in `export`, looked up from inside the namespace."""
        nfs_port, mount_port, _ = self.ports

        def look() -> bytes:
            with MountClient(self.host.gateway, mount_port) as m:
                root, _ = m.mnt(export)
            with NfsClient(self.host.gateway, nfs_port, cred=auth_sys()) as c:
                return c.walk(root, path).data

        return self.inside(look)

    def close(self) -> None:
        for client in self._opened:
            client.close()

        async def stop() -> None:
            for server in self._servers:
                server.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        self._pool.shutdown(wait=False)
