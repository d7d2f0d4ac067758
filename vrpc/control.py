"""VRPC control messages (ATTACH, ATTACHED, REFUSED): a sans-IO codec, bytes in and out.

Theory of operation: a client connects to the server's Unix SOCK_SEQPACKET control socket and
sends one ATTACH packet; the server answers with one ATTACHED packet, carrying the channel's
fds by SCM_RIGHTS in a fixed order, or one REFUSED packet. Each message is XDR (`rpc.xdr`),
at most `MAX_MESSAGE` bytes, and starts with its own magic word, so a reader can tell the
three apart and reject anything else. Decoders raise only `XdrError`, whatever the bytes
(hostile peers included); encoders raise `ValueError` when a field breaks its limit.

    ATTACH   "PVRA" | abi_major u32 | abi_minor u32 | vm string<63> | client_id opaque[16] |
             token opaque<64> | want_slots u32 (0 = default) | flags u32 (ATTACH_*)
    ATTACHED "PVRO" | abi_major u32 | abi_minor u32 | channel_id u64 | boot_id u64 |
             ring_size u64 | meta_size u64 (0 = no table) | vm_ns u32 | root_fh opaque<64> |
             max_io u32 | features u32 (VRPC_F_*)
             + SCM_RIGHTS [ring memfd, kick eventfd, call eventfd, (meta memfd, epoch fd)]
    REFUSED  "PVRR" | status u32 (RefuseStatus) | message string<255>
    GUEST    "PVRG" | abi_major u32 | abi_minor u32 | vm string<63> | owner u32 (GuestOwner) |
             uid u32 | gid u32 (with owner SET: the ring file's new owner)
    GUESTRING "PVRM" | channel_id u64 | mem_path string<1024> | ring_size u64 | nslots u32 |
             created bool

GUEST is an operator's request (`prism vm vrpc-guest`, root or the server's own user only):
the server makes, or finds, the VM's guest channel, a poll-mode ring it keeps open itself for
a QEMU guest (ivshmem-plain over `mem_path`, the ring's file on tmpfs, which outlives the
server's run: `vrpc.guestrings`), and answers GUESTRING (no fds travel) or REFUSED. The channel
is bound to the VM there and then: whoever holds its memory speaks for that VM and no other.
`owner` SET gives the ring's file to uid:gid (a QEMU that runs as another user, e.g. libvirt's;
root only), CLEAR gives it back to the server's user, KEEP leaves the recorded choice.

The design (section 6.2) gave ATTACHED and REFUSED no leading word; they carry one here so that
the client's decoder needs no out-of-band hint. Unknown ATTACH flags are kept, not refused:
the server grants what it knows in ATTACHED's `features`, so a newer-minor client still works.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from prism.limits import VM_NAME_MAX
from rpc.xdr import Packer, Unpacker, XdrError
from vrpc import abi

MAX_MESSAGE = 4096
MAX_VM_NAME = VM_NAME_MAX
CLIENT_ID_SIZE = 16
MAX_TOKEN = 64
MAX_ROOT_FH = 64
MAX_REFUSAL = 255
MAX_MEM_PATH = 1024

ATTACH_MAGIC = 0x50565241  # "PVRA"
GUEST_MAGIC = 0x50565247  # "PVRG"
GUEST_RING_MAGIC = 0x5056524D  # "PVRM"
ATTACHED_MAGIC = 0x5056524F  # "PVRO"
REFUSED_MAGIC = 0x50565252  # "PVRR"

MAX_CHANNELS = 256
"""Channels a server attaches at once, in all (`prism serve --vrpc-max-channels`); beyond,
ATTACH is REFUSED BUSY."""
MAX_CHANNELS_PER_UID = 64
"""Channels one local user may have attached at once; beyond, REFUSED BUSY."""

ATTACH_META = 1  # map the VM's attribute table too
ATTACH_NO_FASTPATH = 2  # answer every call in Python (benchmarks, differential tests)


class GuestOwner(IntEnum):
    KEEP = 0  # the ring file keeps the owner recorded for the VM (the server's user if none)
    SET = 1  # give it to uid:gid, and record that
    CLEAR = 2  # give it back to the server's user


class RefuseStatus(IntEnum):
    ACCES = 1  # no principal of this peer may attach to the VM
    NOENT = 2  # no such VM
    ABI = 3  # another major ABI version
    BUSY = 4  # channel limits reached
    INVAL = 5  # malformed ATTACH


@dataclass(frozen=True, slots=True)
class Attach:
    vm: str
    client_id: bytes
    token: bytes = b""
    want_slots: int = 0
    flags: int = 0
    abi_major: int = abi.ABI_MAJOR
    abi_minor: int = abi.ABI_MINOR


@dataclass(frozen=True, slots=True)
class Attached:
    channel_id: int
    boot_id: int
    ring_size: int
    meta_size: int
    vm_ns: int
    root_fh: bytes
    max_io: int
    features: int
    abi_major: int = abi.ABI_MAJOR
    abi_minor: int = abi.ABI_MINOR

    @property
    def fd_count(self) -> int:
        """How many fds travel with this message: ring, kick, call (+ meta, epoch)."""
        return 5 if self.meta_size else 3


@dataclass(frozen=True, slots=True)
class GuestRequest:
    vm: str
    abi_major: int = abi.ABI_MAJOR
    abi_minor: int = abi.ABI_MINOR
    owner: GuestOwner = GuestOwner.KEEP
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True, slots=True)
class GuestRing:
    """Where a VM's guest channel lives: the file `mem_path`, `ring_size` bytes (a power
    of 2, as an ivshmem BAR must be); `created` if this request made the channel."""

    channel_id: int
    mem_path: str
    ring_size: int
    nslots: int
    created: bool

    def qemu_args(self, vm: str) -> list[str]:
        """The QEMU options giving a guest this ring as ivshmem-plain BAR 2 (PCI 1af4:1110).
        QEMU must run as the server's user or root, to open `mem_path`."""
        memdev = f"prism-vrpc-{vm}"
        return [
            "-object",
            f"memory-backend-file,id={memdev},size={self.ring_size},share=on,"
            f"mem-path={self.mem_path}",
            "-device",
            f"ivshmem-plain,memdev={memdev}",
        ]


@dataclass(frozen=True, slots=True)
class Refused:
    status: RefuseStatus
    message: str


def _utf8(text: str, limit: int, what: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > limit:
        raise ValueError(f"{what} is {len(data)} bytes, more than {limit}")
    return data


def _bounded(data: bytes, limit: int, what: str) -> bytes:
    if len(data) > limit:
        raise ValueError(f"{what} is {len(data)} bytes, more than {limit}")
    return data


def encode_attach(msg: Attach) -> bytes:
    if len(msg.client_id) != CLIENT_ID_SIZE:
        raise ValueError(f"client_id must be {CLIENT_ID_SIZE} bytes, not {len(msg.client_id)}")
    p = Packer()
    p.pack_uint(ATTACH_MAGIC)
    p.pack_uint(msg.abi_major)
    p.pack_uint(msg.abi_minor)
    p.pack_string(_utf8(msg.vm, MAX_VM_NAME, "the VM name"))
    p.pack_fopaque(CLIENT_ID_SIZE, msg.client_id)
    p.pack_opaque(_bounded(msg.token, MAX_TOKEN, "the token"))
    p.pack_uint(msg.want_slots)
    p.pack_uint(msg.flags)
    return p.get_buffer()


def encode_attached(msg: Attached) -> bytes:
    p = Packer()
    p.pack_uint(ATTACHED_MAGIC)
    p.pack_uint(msg.abi_major)
    p.pack_uint(msg.abi_minor)
    p.pack_uhyper(msg.channel_id)
    p.pack_uhyper(msg.boot_id)
    p.pack_uhyper(msg.ring_size)
    p.pack_uhyper(msg.meta_size)
    p.pack_uint(msg.vm_ns)
    p.pack_opaque(_bounded(msg.root_fh, MAX_ROOT_FH, "the root handle"))
    p.pack_uint(msg.max_io)
    p.pack_uint(msg.features)
    return p.get_buffer()


def encode_refused(msg: Refused) -> bytes:
    p = Packer()
    p.pack_uint(REFUSED_MAGIC)
    p.pack_uint(RefuseStatus(msg.status))
    p.pack_string(_utf8(msg.message, MAX_REFUSAL, "the refusal message"))
    return p.get_buffer()


def encode_guest_request(msg: GuestRequest) -> bytes:
    p = Packer()
    p.pack_uint(GUEST_MAGIC)
    p.pack_uint(msg.abi_major)
    p.pack_uint(msg.abi_minor)
    p.pack_string(_utf8(msg.vm, MAX_VM_NAME, "the VM name"))
    p.pack_uint(GuestOwner(msg.owner))
    p.pack_uint(msg.uid)
    p.pack_uint(msg.gid)
    return p.get_buffer()


def encode_guest_ring(msg: GuestRing) -> bytes:
    p = Packer()
    p.pack_uint(GUEST_RING_MAGIC)
    p.pack_uhyper(msg.channel_id)
    p.pack_string(_utf8(msg.mem_path, MAX_MEM_PATH, "the ring's path"))
    p.pack_uhyper(msg.ring_size)
    p.pack_uint(msg.nslots)
    p.pack_bool(msg.created)
    return p.get_buffer()


def _unpacker(data: bytes | memoryview, magic: int, what: str) -> Unpacker:
    if len(data) > MAX_MESSAGE:
        raise XdrError(f"{what} of {len(data)} bytes exceeds {MAX_MESSAGE}")
    u = Unpacker(data)
    word = u.unpack_uint()
    if word != magic:
        raise XdrError(f"expected {what} (magic {magic:#x}), got magic {word:#x}")
    return u


def _text(u: Unpacker, limit: int, what: str) -> str:
    data = u.unpack_string(limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XdrError(f"{what} is not UTF-8") from exc


def decode_attach(data: bytes | memoryview) -> Attach:
    """The ATTACH packet a client sent (server side)."""
    u = _unpacker(data, ATTACH_MAGIC, "ATTACH")
    major = u.unpack_uint()
    minor = u.unpack_uint()
    vm = _text(u, MAX_VM_NAME, "the VM name")
    client_id = u.unpack_fopaque(CLIENT_ID_SIZE)
    token = u.unpack_opaque(MAX_TOKEN)
    want_slots = u.unpack_uint()
    flags = u.unpack_uint()
    u.done()
    return Attach(vm, client_id, token, want_slots, flags, major, minor)


def decode_request(data: bytes | memoryview) -> Attach | GuestRequest:
    """What a control connection asked first (server side): ATTACH or GUEST."""
    if len(data) >= 4 and int.from_bytes(data[:4], "big") == GUEST_MAGIC:
        u = _unpacker(data, GUEST_MAGIC, "GUEST")
        major = u.unpack_uint()
        minor = u.unpack_uint()
        vm = _text(u, MAX_VM_NAME, "the VM name")
        owner = u.unpack_uint()
        uid = u.unpack_uint()
        gid = u.unpack_uint()
        u.done()
        try:
            return GuestRequest(vm, major, minor, GuestOwner(owner), uid, gid)
        except ValueError as exc:
            raise XdrError(f"unknown GUEST owner action {owner}") from exc
    return decode_attach(data)


def _decode_attached(u: Unpacker) -> Attached:
    major = u.unpack_uint()
    minor = u.unpack_uint()
    channel_id = u.unpack_uhyper()
    boot_id = u.unpack_uhyper()
    ring_size = u.unpack_uhyper()
    meta_size = u.unpack_uhyper()
    vm_ns = u.unpack_uint()
    root_fh = u.unpack_opaque(MAX_ROOT_FH)
    max_io = u.unpack_uint()
    features = u.unpack_uint()
    u.done()
    return Attached(
        channel_id, boot_id, ring_size, meta_size, vm_ns, root_fh, max_io, features, major, minor
    )


def _decode_refused(u: Unpacker) -> Refused:
    status = u.unpack_uint()
    message = _text(u, MAX_REFUSAL, "the refusal message")
    u.done()
    try:
        return Refused(RefuseStatus(status), message)
    except ValueError as exc:
        raise XdrError(f"unknown REFUSED status {status}") from exc


def _decode_guest_ring(u: Unpacker) -> GuestRing:
    channel_id = u.unpack_uhyper()
    mem_path = _text(u, MAX_MEM_PATH, "the ring's path")
    size = u.unpack_uhyper()
    nslots = u.unpack_uint()
    created = u.unpack_bool()
    u.done()
    return GuestRing(channel_id, mem_path, size, nslots, created)


def decode_guest_reply(data: bytes | memoryview) -> GuestRing | Refused:
    """The server's answer to GUEST (operator side): GUESTRING or REFUSED."""
    if len(data) > MAX_MESSAGE:
        raise XdrError(f"a reply of {len(data)} bytes exceeds {MAX_MESSAGE}")
    u = Unpacker(data)
    magic = u.unpack_uint()
    if magic == GUEST_RING_MAGIC:
        return _decode_guest_ring(u)
    if magic == REFUSED_MAGIC:
        return _decode_refused(u)
    raise XdrError(f"expected GUESTRING or REFUSED, got magic {magic:#x}")


def decode_reply(data: bytes | memoryview) -> Attached | Refused:
    """The server's answer to ATTACH (client side): ATTACHED or REFUSED."""
    if len(data) > MAX_MESSAGE:
        raise XdrError(f"a reply of {len(data)} bytes exceeds {MAX_MESSAGE}")
    u = Unpacker(data)
    magic = u.unpack_uint()
    if magic == ATTACHED_MAGIC:
        return _decode_attached(u)
    if magic == REFUSED_MAGIC:
        return _decode_refused(u)
    raise XdrError(f"expected ATTACHED or REFUSED, got magic {magic:#x}")
