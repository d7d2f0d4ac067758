"""A private LAN for QEMU guests with addresses of their own, and a server beside them.

Theory of operation
-------------------
``GuestLan(n)`` is one ``tests.netns`` test host (a network namespace joined to the root
namespace by a veth pair) furnished as a LAN:

* a bridge ``br0`` holding ``SERVER_ADDR``/24, the address guests reach the server at;
* ``n`` persistent tap devices ``tap0``.. on that bridge, one per guest; guest ``i`` is
  ``lan.guest_net(i)``: ``GUEST_BASE + i`` (``10.77.0.11``, ``10.77.0.12``...), hostname
  ``guest<i+1>``, for ``tests.guest.harness.GuestSession(net=...)`` (QEMU runs in the
  namespace and opens its tap there).

A server runs in the namespace (``lan.command(argv)``, bound to 0.0.0.0): guests reach it at
``SERVER_ADDR``, it reaches each guest at its own address (NLM GRANTED, SM_NOTIFY), and the
test process reaches it from the root namespace at ``lan.host.address`` (its own calls come
from ``lan.host.gateway``). The namespace has its own port 111, so a server can run its
portmapper there whatever the host runs. Nothing leaves the namespace but the veth's /24:
the LAN has no route to the root namespace, nor the root namespace to it. Removing the
namespace (``close()``, or the sweep of a dead process's namespaces) removes the bridge and
the taps with it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from tests.guest.harness import TapNetwork
from tests.netns import NamespaceHost, TestHosts

LAN_PREFIX = "10.77.0"
PREFIXLEN = 24
SERVER_ADDR = f"{LAN_PREFIX}.1"
GUEST_BASE = 11  # guest i is LAN_PREFIX.(GUEST_BASE + i)
BRIDGE = "br0"
MAX_GUESTS = 100


class GuestLan:
    """Context manager: a namespace with a bridge, the server's address and ``count`` taps."""

    def __init__(self, count: int = 2) -> None:
        if not 1 <= count <= MAX_GUESTS:
            raise ValueError(f"count must be 1..{MAX_GUESTS}, got {count}")
        self.count = count
        self._hosts = TestHosts(1, prefix="prism-lan")

    @property
    def host(self) -> NamespaceHost:
        return self._hosts[0]

    @property
    def netns(self) -> str:
        return self.host.name

    def start(self) -> Self:
        self._hosts.start()
        try:
            self._ip("link", "add", BRIDGE, "type", "bridge")
            self._ip("addr", "add", f"{SERVER_ADDR}/{PREFIXLEN}", "dev", BRIDGE)
            self._ip("link", "set", BRIDGE, "up")
            for i in range(self.count):
                tap = self.guest_net(i).tap
                self._ip("tuntap", "add", "dev", tap, "mode", "tap")
                self._ip("link", "set", tap, "master", BRIDGE)
                self._ip("link", "set", tap, "up")
        except BaseException:
            self._hosts.close()
            raise
        return self

    def close(self) -> None:
        self._hosts.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def guest_net(self, i: int) -> TapNetwork:
        """Guest ``i``'s NIC: its tap, address and name (no default route: the LAN is all)."""
        if not 0 <= i < self.count:
            raise IndexError(f"guest {i} of {self.count}")
        return TapNetwork(
            netns=self.netns,
            tap=f"tap{i}",
            address=f"{LAN_PREFIX}.{GUEST_BASE + i}",
            prefixlen=PREFIXLEN,
            hostname=f"guest{i + 1}",
        )

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the LAN's namespace."""
        return self.host.command(argv)

    def _ip(self, *args: str) -> None:
        proc = subprocess.run(
            ["ip", "-n", self.netns, *args], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ip -n {self.netns} {' '.join(args)}: {proc.stderr.strip()}")
