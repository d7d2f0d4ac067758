"""The VRPC shared-memory ABI 1.0 as Python constants: a mirror of `native/vrpc.h`.

`native/vrpc.h` is the single source of truth; this module repeats its numbers for the
pure-Python backend (`vrpc.pyring`) and for code that must not depend on the C build.
`tests/test_vrpc_abi.py` checks every constant and offset here against the compiled module
(`ffi.offsetof`, `ffi.sizeof`, `lib.VRPC_*`), so the two cannot drift apart unnoticed.

Ring segment layout: `[0, 4096)` header, `[4096, 8192)` SQ then CQ (16-byte entries, at most
128 each), `[8192, 8192 + nslots * SLOT_SIZE)` slots. All integers are native-endian; indices
are free-running uint32 and an index `i` names entry `i & (entries - 1)`.
"""

from __future__ import annotations

from rpc.record import MAX_RECORD_SIZE

RING_MAGIC = 0x3152564D53495250  # b"PRISMVR1" read as a little-endian u64
META_MAGIC = 0x31544D4D53495250  # b"PRISMMT1"
EPOCH_MAGIC = 0x3150454D53495250  # b"PRISMEP1"
ABI_MAJOR = 1
ABI_MINOR = 0
HEADER_SIZE = 4096
SLOT_SIZE = 1114112
MAX_SLOTS = 64
MAX_ENTRIES = 128
DOORBELL_EVENTFD = 1
DOORBELL_POLL = 2
CLIENT_WAITING = 1
SERVER_IDLE = 1
SERVER_CLOSED = 2
SERVER_GONE = 4  # with CLOSED: no server resets this ring again (a guest stops waiting)
CQE_NOREPLY = 1
CQE_FAST = 2
F_FASTPATH = 1
F_META = 2
ATTR_VALID = 1
ATTR_READONLY = 2
ERR_SQ_OVERRUN = 1
ERR_SQE_FLAGS = 2
ERR_SQE_SLOT = 3
ERR_SQE_LEN = 4
ERR_SLOT_BUSY = 5
META_HEADER_SIZE = 4096
ATTR_ENTRY_SIZE = 128
FATTR3_SIZE = 84
MAC_SIZE = 16
META_MIN_BUCKETS = 2
META_MAX_BUCKETS = 1 << 20
EPOCH_SIZE = 4096
FAST_MAX_RECORD = 512  # records the C fast path looks at (copied to its stack)
FAST_GETATTR_REPLY = 112  # xid | REPLY | ACCEPTED | AUTH_NONE, 0 | SUCCESS | NFS3_OK | fattr3
FAST_NULL_REPLY = 24
PUMP_MORE = 1  # vrpc_srv_pump: call again (records for Python first, or the batch is spent)
PUMP_ARMED = 2  # vrpc_srv_pump: the ring is armed and empty; the client kicks next
DEFAULT_META_BUCKETS = 65536  # prism serve --vrpc-meta-entries: 8 MiB (+4 KiB) per VM

SQ_OFFSET = HEADER_SIZE
SLOT_OFFSET = 2 * HEADER_SIZE
ENTRY_SIZE = 16  # struct vrpc_sqe and struct vrpc_cqe: slot, len, flags, reserved (u32 each)
DEFAULT_SLOTS = 16

assert SLOT_SIZE == MAX_RECORD_SIZE, "a slot holds any record the RPC core accepts"

# name: (offset, size in bytes), per struct, in declaration order.
RING_HEADER = {
    "magic": (0, 8),
    "abi_major": (8, 2),
    "abi_minor": (10, 2),
    "header_size": (12, 4),
    "segment_size": (16, 8),
    "boot_id": (24, 8),
    "channel_id": (32, 8),
    "sq_offset": (40, 4),
    "cq_offset": (44, 4),
    "entries": (48, 4),
    "nslots": (52, 4),
    "slot_offset": (56, 4),
    "slot_size": (60, 4),
    "doorbell": (64, 4),
    "features": (68, 4),
    "sq_tail": (128, 4),
    "client_flags": (132, 4),
    "sq_head": (192, 4),
    "server_flags": (196, 4),
    "cq_tail": (256, 4),
    "cq_head": (320, 4),
}
ENTRY = {"slot": (0, 4), "len": (4, 4), "flags": (8, 4), "reserved": (12, 4)}
META_HEADER = {
    "magic": (0, 8),
    "abi_major": (8, 2),
    "abi_minor": (10, 2),
    "header_size": (12, 4),
    "attr_offset": (16, 4),
    "attr_buckets": (20, 4),
    "dent_offset": (24, 4),
    "dent_buckets": (28, 4),
    "vm_ns": (32, 4),
    "reserved": (36, 4),
    "boot_id": (40, 8),
    "table_epoch": (128, 4),
}
ATTR_ENTRY = {
    "seq": (0, 4),
    "store_epoch": (4, 4),
    "table_epoch": (8, 4),
    "flags": (12, 4),
    "ns": (16, 4),
    "vol": (20, 2),
    "reserved": (22, 2),
    "ino": (24, 8),
    "gen": (32, 8),
    "fattr3": (40, 84),
}
EPOCH_FILE = {"magic": (0, 8), "begun": (64, 8), "ended": (128, 8)}
SIZES = {
    "struct vrpc_ring_header": HEADER_SIZE,
    "struct vrpc_sqe": ENTRY_SIZE,
    "struct vrpc_cqe": ENTRY_SIZE,
    "struct vrpc_meta_header": 4096,
    "struct vrpc_attr_entry": 128,
    "struct vrpc_epoch_file": 4096,
}
STRUCTS = {
    "struct vrpc_ring_header": RING_HEADER,
    "struct vrpc_sqe": ENTRY,
    "struct vrpc_cqe": ENTRY,
    "struct vrpc_meta_header": META_HEADER,
    "struct vrpc_attr_entry": ATTR_ENTRY,
    "struct vrpc_epoch_file": EPOCH_FILE,
}


def ring_size(nslots: int) -> int:
    """Bytes of a ring segment with `nslots` slots."""
    if not 1 <= nslots <= MAX_SLOTS:
        raise ValueError(f"a channel has 1..{MAX_SLOTS} slots, not {nslots}")
    return SLOT_OFFSET + nslots * SLOT_SIZE


def default_entries(nslots: int) -> int:
    """The smallest power of two holding `nslots` entries: SQ and CQ cannot overflow."""
    return 1 << max(0, nslots - 1).bit_length()


def meta_size(buckets: int) -> int:
    """Bytes of an attribute table of `buckets` entries (a power of two within the limits)."""
    if not META_MIN_BUCKETS <= buckets <= META_MAX_BUCKETS or buckets & (buckets - 1):
        raise ValueError(
            f"an attribute table has a power of two of {META_MIN_BUCKETS}..{META_MAX_BUCKETS}"
            f" entries, not {buckets}"
        )
    return META_HEADER_SIZE + buckets * ATTR_ENTRY_SIZE


_NS_END = 1 << 8 * ATTR_ENTRY["ns"][1]
_VOL_END = 1 << 8 * ATTR_ENTRY["vol"][1]
_INO_END = 1 << 8 * ATTR_ENTRY["ino"][1]
_FLAGS_END = 1 << 8 * ATTR_ENTRY["flags"][1]
_U64_END = 1 << 64
_ATTR_FLAGS = ATTR_VALID | ATTR_READONLY


def _check_uint(name: str, value: int, end: int) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} is an integer, not {type(value).__name__}")
    if not 0 <= value < end:
        raise ValueError(f"{name} is a {(end - 1).bit_length()}-bit unsigned integer, not {value}")


def check_key(ns: int, vol: int, ino: int) -> None:
    """Refuse a key `(ns, vol, ino)` that does not fit its `ATTR_ENTRY` fields."""
    if type(ns) is type(vol) is type(ino) is int and (
        0 <= ns < _NS_END and 0 <= vol < _VOL_END and 0 <= ino < _INO_END
    ):
        return  # the common case, one test (publish runs for every reply carrying attributes)
    _check_uint("ns", ns, _NS_END)
    _check_uint("vol", vol, _VOL_END)
    _check_uint("ino", ino, _INO_END)


def check_publish(
    ns: int, vol: int, ino: int, fattr3: bytes, flags: int, mac: bytes | None, epoch0: int
) -> None:
    """Refuse what no `struct vrpc_attr_entry` can hold, for both table backends alike.

    The key (`check_key`) and flags fit their fields, flags hold only `ATTR_*` bits, `fattr3`
    is `FATTR3_SIZE` bytes, a MAC `MAC_SIZE` bytes and `epoch0` a u64 store epoch. TypeError
    for a wrong type, ValueError for a wrong size or range; nothing is written.
    """
    check_key(ns, vol, ino)
    if not (
        type(flags) is type(epoch0) is int and 0 <= flags < _FLAGS_END and 0 <= epoch0 < _U64_END
    ):
        _check_uint("flags", flags, _FLAGS_END)
        _check_uint("epoch0", epoch0, _U64_END)
    if flags & ~_ATTR_FLAGS:
        raise ValueError(f"flags {flags:#x} has bits beyond ATTR_VALID | ATTR_READONLY")
    if type(fattr3) is not bytes:
        raise TypeError(f"a fattr3 is bytes, not {type(fattr3).__name__}")
    if len(fattr3) != FATTR3_SIZE:
        raise ValueError(f"a fattr3 has {FATTR3_SIZE} bytes, not {len(fattr3)}")
    if mac is not None:
        if type(mac) is not bytes:
            raise TypeError(f"a MAC is bytes, not {type(mac).__name__}")
        if len(mac) != MAC_SIZE:
            raise ValueError(f"a MAC has {MAC_SIZE} bytes, not {len(mac)}")


def describe_error(code: int, index: int, value: int, nslots: int, entries: int) -> str:
    """What a server-side protocol error (`ERR_*`, with its SQ index and word) means."""
    if code == ERR_SQ_OVERRUN:
        return f"sq_tail {value} is more than {entries} entries ahead of sq_head {index}"
    if code == ERR_SQE_FLAGS:
        return f"SQE {index} carries unknown flags {value:#x}"
    if code == ERR_SQE_SLOT:
        return f"SQE {index} names slot {value}, beyond the channel's {nslots} slots"
    if code == ERR_SQE_LEN:
        return f"SQE {index} has length {value}, beyond the slot size {SLOT_SIZE}"
    if code == ERR_SLOT_BUSY:
        return f"SQE {index} names slot {value}, which is still in flight"
    return f"protocol error {code} at SQ index {index} (word {value})"
