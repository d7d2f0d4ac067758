"""Which client addresses may reach which VM: the binding between VMs and CIDRs."""

from __future__ import annotations

import functools
import ipaddress

from prism.store.types import NamespaceInfo

LOOPBACK = ("127.0.0.0/8", "::1/128")
"""Where a VM with no client addresses can be reached from."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=1024)
def _networks(clients: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in (clients or LOOPBACK))


@functools.lru_cache(maxsize=4096)
def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_allowed(info: NamespaceInfo, host: str) -> bool:
    """Whether a caller at `host` is bound to the VM (or snapshot) `info`."""
    return clients_allow(info.clients, host)


@functools.lru_cache(maxsize=8192)
def clients_allow(clients: tuple[str, ...], host: str) -> bool:
    """Whether `host` falls in `clients` (CIDRs; empty means loopback only)."""
    addr = _address(host)
    if addr is None:
        return False
    return any(addr.version == net.version and addr in net for net in _networks(clients))


def export_groups(info: NamespaceInfo) -> tuple[str, ...]:
    return info.clients or LOOPBACK
