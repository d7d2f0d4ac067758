"""Who may reach which VM, and as whom: client CIDRs, privileged ports, squashing.

A VM's `Export` (`prism.store.types`) decides, per call: the caller's address must fall in
its CIDRs; a `secure` VM answers only calls from privileged source ports (below 1024, which
only root can bind: the kernel client and libnfs running as root use them), as knfsd's
default `secure`; and `squash` maps AUTH_SYS callers to the anonymous uid/gid as knfsd's
root_squash / all_squash do (AUTH_NONE callers are always anonymous).

Over VRPC (the shared-memory transport, `vrpc.server`) a local process attaches a channel to
one VM: it may if it presents the VM's token, or presents none and its kernel-verified uid
or one of its groups (SO_PEERCRED, SO_PEERGROUPS) is among the VM's `vrpc_users` /
`vrpc_groups`; a VM that lists no users and no groups admits root (and token holders) only, as a
VM with no client addresses admits loopback only. Squashing applies as on any transport.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from dataclasses import dataclass, field

from prism.store.types import Cred, Export, NamespaceInfo

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
    """MOUNT EXPORT's groups of a VM or snapshot: each client CIDR with the export's
    options, as `exportfs -v` prints them: `10.0.0.0/24(rw,secure,root_squash)`."""
    options = export_flags(info)
    return tuple(f"{cidr}({options})" for cidr in info.clients or LOOPBACK)


def export_flags(info: NamespaceInfo) -> str:
    """A VM's (or snapshot's) export options in /etc/exports words: ro|rw, secure|insecure,
    no_root_squash|root_squash|all_squash (with anonuid=N,anongid=N when squashing)."""
    e = info.export
    words = [
        "ro" if e.read_only or info.readonly else "rw",
        "secure" if e.secure else "insecure",
        {"none": "no_root_squash", "root": "root_squash", "all": "all_squash"}[e.squash],
    ]
    if e.squash != "none":
        words += [f"anonuid={e.anon_uid}", f"anongid={e.anon_gid}"]
    return ",".join(words)


PRIVILEGED_PORTS = 1024
"""Source ports below this can only be bound by root (`secure` VMs require one)."""


def port_allowed(export: Export, port: int) -> bool:
    """Whether a call from source `port` may reach the VM (any port unless `secure`)."""
    return port < PRIVILEGED_PORTS or not export.secure


def effective_cred(export: Export, sent: Cred | None) -> Cred:
    """Who the caller acts as: its AUTH_SYS credential (None for AUTH_NONE) as the VM's
    squash maps it. `root` maps uid 0, gid 0 and group 0 (as knfsd's root_squash)."""
    if sent is None or export.squash == "all":
        return Cred(export.anon_uid, export.anon_gid, ())
    if export.squash == "root":
        anon = export.anon_gid
        return Cred(
            export.anon_uid if sent.uid == 0 else sent.uid,
            anon if sent.gid == 0 else sent.gid,
            tuple(anon if g == 0 else g for g in sent.groups),
        )
    return sent


@dataclass(frozen=True, slots=True)
class LocalPeer:
    """Who is at the other end of a VRPC control socket, as the kernel reports it, and the
    token it presented (b"" for none)."""

    pid: int
    uid: int
    gids: frozenset[int]
    token: bytes = field(default=b"", repr=False)


def vrpc_allows(export: Export, peer: LocalPeer) -> bool:
    """Whether `peer` may attach to (and go on calling) the VM of `export`; checked on every
    call, so a changed VM record bites on the next one. A peer that presented a token lives
    by it (compared in constant time): once the token is rotated, its uid does not save it."""
    if peer.token:
        return hmac.compare_digest(peer.token, export.vrpc_token.encode())
    return _principal_allows(export.vrpc_users, export.vrpc_groups, peer.uid, peer.gids)


@functools.lru_cache(maxsize=4096)
def _principal_allows(
    users: tuple[int, ...], groups: tuple[int, ...], uid: int, gids: frozenset[int]
) -> bool:
    if not users and not groups:
        return uid == 0
    return uid in users or not gids.isdisjoint(groups)
