"""Network-namespace test hosts: stand-in VMs, each with its own real source address.

Theory of operation
-------------------
Prism binds each export to client addresses, so isolation tests need clients whose packets
really arrive from distinct addresses. ``TestHosts(n)`` builds ``n`` such clients:

* a named network namespace ``<prefix>-<pid>-<serial>`` (``prism-t-4242-0``), created with
  ``pyroute2.netns.create`` under ``/var/run/netns`` so that ``ip netns exec`` can enter it;
* a veth pair: the host end ``pn<pid>x<serial>`` stays in the root namespace with the
  gateway address ``10.213.<k>.1/24``; the other end is created directly inside the
  namespace as ``eth0`` with the host's address ``10.213.<k>.2/24``; ``lo`` is brought up.

The namespace gets no default route, so it reaches only its own /24: the root namespace
(the gateway address, or any server bound to ``0.0.0.0``) and nothing else, not even another
test host. ``10.213.0.0/16`` exists only on these veth links and is never routed elsewhere.

Concurrency and crashes. Several test processes (pytest workers, other sessions) may share
the machine. A process-wide lock file ``/run/prism-netns/pid-<pid>.lock`` is flock()ed for the
lifetime of every process that creates hosts; the kernel drops it when the process dies,
however it dies. Setup runs under ``/run/prism-netns/setup.lock`` and first sweeps stale
resources with the same prefix: namespaces and host links whose owner pid no longer holds
its lock (or, for our own pid, that this process did not create: a dead predecessor with
the same pid left them). Subnets ``<k>`` are chosen under the same lock from those with no
address on the host, so concurrent runs never collide. ``close()`` (also run by
``__exit__`` and at interpreter exit) removes host links and namespaces and tolerates their
being gone already.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = Path("/run/prism-netns")
SETUP_LOCK = LOCK_DIR / "setup.lock"
DEFAULT_PREFIX = "prism-t"
SUBNET_BASE = "10.213"  # 10.213.<k>.0/24 per host; exists only on our veth links
SUBNET_COUNT = 256
PREFIXLEN = 24
GATEWAY_OCTET = 1
HOST_OCTET = 2
GUEST_IFNAME = "eth0"
HOST_LINK_RE = re.compile(r"^pn(\d+)x(\d+)$")
DEFAULT_TIMEOUT = 60.0

_state_lock = threading.Lock()
_serials = itertools.count()
_process_lock_fd: int | None = None
_live: set[str] = set()  # namespaces and host links this process created and still owns


class NetnsError(RuntimeError):
    """Setting up or tearing down test hosts failed."""


class NamespaceCommandError(subprocess.CalledProcessError):
    """A command run inside a test host exited non-zero; str() includes its output."""

    def __str__(self) -> str:
        parts = [super().__str__()]
        if self.stdout:
            parts.append(f"--- stdout ---\n{self.stdout}")
        if self.stderr:
            parts.append(f"--- stderr ---\n{self.stderr}")
        return "\n".join(parts)


@dataclass(frozen=True, slots=True)
class NamespaceHost:
    """One test host: a network namespace with its own address, reachable from the host."""

    name: str  # namespace name, as shown by `ip netns list`
    address: str  # the namespace's own address (the source address servers see)
    gateway: str  # host-side address on the same /24
    prefixlen: int
    host_ifname: str  # veth end in the root namespace
    ifname: str = GUEST_IFNAME  # veth end inside the namespace

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so that it executes inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the namespace; text output captured; raises on failure by default."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc: subprocess.CompletedProcess[str] = subprocess.run(
            self.command(argv), timeout=timeout, check=False, **kw
        )
        if check and proc.returncode != 0:
            raise NamespaceCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start `argv` inside the namespace without waiting (servers, long-lived clients)."""
        kw.setdefault("text", True)
        return subprocess.Popen(self.command(argv), **kw)

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a python snippet inside the namespace with the repo on PYTHONPATH."""
        kw["env"] = python_env(kw.get("env"))
        return self.run([sys.executable, "-c", textwrap.dedent(code), *args], **kw)


def python_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: os.environ) with the repository root first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) if not old else f"{REPO_ROOT}{os.pathsep}{old}"
    return env


class TestHosts:
    """Context manager creating `count` namespace test hosts; all removed on exit.

    ``with TestHosts(2) as hosts: a, b = hosts`` -- also indexable, iterable and sized.
    ``start()``/``close()`` are available for fixtures; ``close()`` is idempotent.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class despite the name

    def __init__(self, count: int = 2, *, prefix: str = DEFAULT_PREFIX) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", prefix):
            raise ValueError(f"prefix must be letters, digits and '-', got {prefix!r}")
        self.count = count
        self.prefix = prefix
        self.hosts: tuple[NamespaceHost, ...] = ()
        self._namespaces: list[str] = []  # created, in order
        self._links: list[str] = []  # host-side veth ends created, in order

    def start(self) -> Self:
        if self._namespaces:
            raise NetnsError("TestHosts already started")
        _claim_process_lock()
        atexit.register(self.close)
        try:
            with _locked(SETUP_LOCK):
                sweep_stale(self.prefix)
                subnets = _free_subnets(self.count)
                self.hosts = tuple(self._create_host(k) for k in subnets)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every link and namespace this object created; tolerate partial state."""
        atexit.unregister(self.close)
        errors: list[str] = []
        with IPRoute() as ipr:
            while self._links:
                link = self._links.pop()
                _live.discard(link)
                try:
                    _delete_link(ipr, link)
                except (OSError, NetlinkError) as exc:
                    errors.append(f"link {link}: {exc}")
        while self._namespaces:
            name = self._namespaces.pop()
            _live.discard(name)
            try:
                _remove_namespace(name)
            except OSError as exc:
                errors.append(f"namespace {name}: {exc}")
        self.hosts = ()
        if errors:
            raise NetnsError("test host cleanup incomplete: " + "; ".join(errors))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getitem__(self, index: int) -> NamespaceHost:
        return self.hosts[index]

    def __iter__(self) -> Iterator[NamespaceHost]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def _create_host(self, k: int) -> NamespaceHost:
        serial = next(_serials)
        pid = os.getpid()
        host = NamespaceHost(
            name=f"{self.prefix}-{pid}-{serial}",
            address=f"{SUBNET_BASE}.{k}.{HOST_OCTET}",
            gateway=f"{SUBNET_BASE}.{k}.{GATEWAY_OCTET}",
            prefixlen=PREFIXLEN,
            host_ifname=f"pn{pid}x{serial}",
        )
        netns.create(host.name)
        self._namespaces.append(host.name)
        _live.add(host.name)
        with IPRoute() as ipr:
            ipr.link(
                "add",
                ifname=host.host_ifname,
                kind="veth",
                peer={"ifname": host.ifname, "net_ns_fd": host.name},
            )
            self._links.append(host.host_ifname)
            _live.add(host.host_ifname)
            index = _link_index(ipr, host.host_ifname)
            ipr.addr("add", index=index, address=host.gateway, prefixlen=host.prefixlen)
            ipr.link("set", index=index, state="up")
        with IPRoute(netns=host.name, flags=0) as nsr:
            nsr.link("set", index=_link_index(nsr, "lo"), state="up")
            index = _link_index(nsr, host.ifname)
            nsr.addr("add", index=index, address=host.address, prefixlen=host.prefixlen)
            nsr.link("set", index=index, state="up")
        return host


def sweep_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces named `<prefix>-<pid>-<n>` and host links `pn<pid>x<n>` whose
    owning process is gone. Returns what was removed. Call with SETUP_LOCK held."""
    name_re = re.compile(rf"^{re.escape(prefix)}-(\d+)-(\d+)$")
    removed: list[str] = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get("IFLA_IFNAME") or ""
            m = HOST_LINK_RE.match(ifname)
            if m and _is_stale(ifname, int(m.group(1))):
                with contextlib.suppress(OSError, NetlinkError):
                    _delete_link(ipr, ifname)
                    removed.append(ifname)
    for name in netns.listnetns():
        m = name_re.match(name)
        if m and _is_stale(name, int(m.group(1))):
            with contextlib.suppress(OSError):
                _remove_namespace(name)
                removed.append(name)
    return removed


@functools.cache
def netns_unavailable_reason() -> str | None:
    """None if this process can build test hosts, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "network namespace tests need the `ip` command (iproute2)"
    try:
        with TestHosts(1, prefix=f"{DEFAULT_PREFIX}-probe") as hosts:
            hosts[0].run(["true"])
    except Exception as exc:
        return f"cannot create a network namespace with a veth pair: {exc!r}"
    return None


def netns_available() -> bool:
    """True if root and a namespace with a veth pair can actually be created."""
    return netns_unavailable_reason() is None


def require_netns() -> None:
    """pytest.skip() with a clear reason unless test hosts can be created."""
    import pytest

    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


# --- internals ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pid_lock_path(pid: int) -> Path:
    return LOCK_DIR / f"pid-{pid}.lock"


def _claim_process_lock() -> None:
    """Hold our pid's liveness lock until the process exits."""
    global _process_lock_fd
    with _state_lock:
        if _process_lock_fd is not None:
            return
        with _locked(SETUP_LOCK):
            pid = os.getpid()
            fd = os.open(_pid_lock_path(pid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise NetnsError(
                    f"{_pid_lock_path(pid)} is held by another process with pid {pid} "
                    "(a different pid namespace?); cannot claim test host names"
                ) from None
            _process_lock_fd = fd
        atexit.register(_release_process_lock)


def _release_process_lock() -> None:
    """Drop our liveness lock file at exit (under SETUP_LOCK, so no sweeper is probing it)."""
    global _process_lock_fd
    with _state_lock:
        if _process_lock_fd is None:
            return
        with _locked(SETUP_LOCK), contextlib.suppress(FileNotFoundError):
            _pid_lock_path(os.getpid()).unlink()
        os.close(_process_lock_fd)
        _process_lock_fd = None


def _is_stale(name: str, pid: int) -> bool:
    """True unless `name`'s owner `pid` is alive. Our own pid's names are stale unless we
    created them: they were left by an earlier process that had the same pid."""
    if pid == os.getpid():
        return name not in _live
    return _owner_is_dead(pid)


def _owner_is_dead(pid: int) -> bool:
    """True unless `pid` holds its liveness lock. Call with SETUP_LOCK held."""
    path = _pid_lock_path(pid)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the lock if we got it
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # safe: claims also happen under SETUP_LOCK
    return True


def _free_subnets(count: int) -> list[int]:
    """`count` values of k with no address in 10.213.k.0/24 on the host. SETUP_LOCK held."""
    used: set[int] = set()
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=socket.AF_INET):
            octets = (addr.get("IFA_ADDRESS") or "").split(".")
            if len(octets) == 4 and ".".join(octets[:2]) == SUBNET_BASE:
                used.add(int(octets[2]))
    free = [k for k in range(SUBNET_COUNT) if k not in used]
    if len(free) < count:
        raise NetnsError(
            f"only {len(free)} free {SUBNET_BASE}.x.0/24 subnets for {count} test hosts; "
            "remove stale veth links (ip -br addr | grep pn)"
        )
    return free[:count]


def _link_index(ipr: IPRoute, ifname: str) -> int:
    indices = ipr.link_lookup(ifname=ifname)
    if not indices:
        raise NetnsError(f"link {ifname} not found")
    return int(indices[0])


def _delete_link(ipr: IPRoute, ifname: str) -> None:
    indices = ipr.link_lookup(ifname=ifname)
    if not indices:
        return
    try:
        ipr.link("del", index=indices[0])
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:  # deleted with its peer meanwhile
            raise


def _remove_namespace(name: str) -> None:
    if name not in netns.listnetns():
        return
    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)
