"""The pure-Python attribute table: the same functions as `native/vrpc_meta.c`, over mmap.

The reference the C code is tested against (every table test runs on both backends) and the
fallback without a compiler. Layout, seqlock and freshness rules are those of vrpc_meta.c's
header comment and design section 7: one writer (the server's loop thread); an entry is
rewritten as seq odd, every other u32 word stored whole, seq even; a reader loads seq (odd:
retry), copies the entry, reloads seq (changed: retry) and accepts it only if it is valid, its
key matches, it carries the stable store epoch (`begun == ended`, `prism.store.epoch`) and the
live table epoch, and both are unchanged after the copy.

Shared words are items of a `memoryview.cast("I")` of the mapping, one aligned load or store
each (never `struct.pack_into`, which zeroes before it writes: see `vrpc.pyring`); on x86 loads
are not reordered with loads nor stores with stores, which gives the seqlock its order.
`publish` returns what the C does: the bucket index, `-ENOENT` or `-ESTALE`.
"""

from __future__ import annotations

import errno
import mmap
import struct

from prism.store.epoch import EpochFile
from vrpc import abi

_M64 = 0xFFFFFFFFFFFFFFFF
# struct vrpc_attr_entry: seq, store_epoch, table_epoch, flags, ns, vol, reserved, ino, gen,
# fattr3[84], pad[4]
_ENTRY = struct.Struct("=IIIIIHHQQ84s4x")
_ENTRY_WORDS = abi.ATTR_ENTRY_SIZE // 4
_TABLE_EPOCH_WORD = abi.META_HEADER["table_epoch"][0] // 4
_HEADER = struct.Struct("=QHHIIIIIII")  # magic .. reserved (@0..@40)
assert _ENTRY.size == abi.ATTR_ENTRY_SIZE


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def bucket(buckets: int, ns: int, vol: int, ino: int) -> int:
    """The even bucket of a key; it lives there or in the next one (vrpc_meta_bucket)."""
    h = _mix64(ino ^ _mix64((ns << 16) | vol))
    return h & (buckets - 1) & ~1


class MetaOpenError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def open_error(err: int) -> MetaOpenError:
    if err == errno.EBADMSG:
        return MetaOpenError(err, "not a VRPC attribute table or epoch file (bad magic)")
    if err == errno.EPROTONOSUPPORT:
        return MetaOpenError(
            err, f"the attribute table has another VRPC ABI major version (this: {abi.ABI_MAJOR})"
        )
    return MetaOpenError(err, "the attribute table's geometry is inconsistent: not mapping it")


class _Table:
    """What both ends share: the views and the reader."""

    def __init__(self, buf: mmap.mmap, buckets: int, epoch: EpochFile | None) -> None:
        self._buf = buf
        self._view = memoryview(buf)
        self._u32 = self._view[: abi.meta_size(buckets)].cast("I")
        self.buckets = buckets
        self._epoch = epoch
        self._macs: bytearray | None = None

    def lookup(self, ns: int, vol: int, ino: int, mac: bytes | None = None) -> bytes | None:
        """The key's fresh fattr3 (84 bytes), or None (vrpc_meta_lookup)."""
        begun = 0
        if self._epoch is not None:
            stable = self._epoch.stable()
            if stable is None:
                return None
            begun = stable
        u32 = self._u32
        te = u32[_TABLE_EPOCH_WORD]
        b = bucket(self.buckets, ns, vol, ino)
        for idx in (b, b ^ 1):
            word = (abi.META_HEADER_SIZE + idx * abi.ATTR_ENTRY_SIZE) // 4
            start = word * 4
            for _ in range(3):
                s1 = u32[word]
                if s1 & 1:
                    continue
                raw = self._view[start : start + abi.ATTR_ENTRY_SIZE].tobytes()
                if u32[word] == s1:
                    break
            else:
                return None  # being rewritten: the RPC path answers
            _, store_epoch, table_epoch, flags, e_ns, e_vol, _, e_ino, _, fattr3 = _ENTRY.unpack(
                raw
            )
            if not flags & abi.ATTR_VALID or (e_ns, e_vol, e_ino) != (ns, vol, ino):
                continue
            if store_epoch != begun & 0xFFFFFFFF or table_epoch != te:
                return None
            if mac is not None:
                macs = self._macs
                if macs is None or macs[idx * abi.MAC_SIZE : (idx + 1) * abi.MAC_SIZE] != mac:
                    return None
            if self._epoch is not None and self._epoch.begun != begun:
                return None
            if u32[_TABLE_EPOCH_WORD] != te:
                return None
            return bytes(fattr3)
        return None

    def release(self) -> None:
        self._u32.release()
        self._view.release()


class PyMetaWriter(_Table):
    """The server's end of one VM's table (vrpc_meta_init/publish/invalidate/bump/lookup)."""

    def __init__(
        self,
        buf: mmap.mmap,
        *,
        buckets: int,
        vm_ns: int,
        boot_id: int = 0,
        epoch: EpochFile | None = None,
    ) -> None:
        size = abi.meta_size(buckets)  # ValueError when out of range
        if len(buf) < size:
            raise ValueError(f"a table of {buckets} entries needs {size} bytes, not {len(buf)}")
        super().__init__(buf, buckets, epoch)
        self._macs = bytearray(buckets * abi.MAC_SIZE)
        self.vm_ns = vm_ns
        self.table_epoch = 1
        self._gen = 0
        buf[8 : 8 + _HEADER.size - 8] = _HEADER.pack(
            0, abi.ABI_MAJOR, abi.ABI_MINOR, abi.META_HEADER_SIZE, abi.META_HEADER_SIZE,
            buckets, 0, 0, vm_ns, 0,
        )[8:]  # fmt: skip
        buf[40:48] = boot_id.to_bytes(8, "little")
        self._u32[_TABLE_EPOCH_WORD] = 1
        with self._view[:8].cast("Q") as magic:
            magic[0] = abi.META_MAGIC

    def _entry(self, idx: int) -> tuple[int, ...]:
        start = abi.META_HEADER_SIZE + idx * abi.ATTR_ENTRY_SIZE
        return _ENTRY.unpack(self._view[start : start + abi.ATTR_ENTRY_SIZE])

    def _live(self, e: tuple[int, ...]) -> bool:
        return bool(e[3] & abi.ATTR_VALID) and e[2] == self.table_epoch

    def _find(self, ns: int, vol: int, ino: int) -> int:
        b = bucket(self.buckets, ns, vol, ino)
        for idx in (b, b ^ 1):
            e = self._entry(idx)
            if self._live(e) and (e[4], e[5], e[7]) == (ns, vol, ino):
                return idx
        return -errno.ENOENT

    def _write(self, idx: int, entry: bytes) -> None:
        u32 = self._u32
        word = (abi.META_HEADER_SIZE + idx * abi.ATTR_ENTRY_SIZE) // 4
        s = u32[word]
        u32[word] = (s + 1) & 0xFFFFFFFF
        words = memoryview(entry).cast("I")
        for i in range(1, _ENTRY_WORDS):
            u32[word + i] = words[i]
        u32[word] = (s + 2) & 0xFFFFFFFF

    def publish(
        self,
        ns: int,
        vol: int,
        ino: int,
        fattr3: bytes,
        *,
        flags: int = 0,
        mac: bytes | None = None,
        epoch0: int = 0,
        insert: bool = True,
    ) -> int:
        """Write the key's fattr3: its bucket index, -ENOENT or -ESTALE (vrpc_meta_publish)."""
        abi.check_publish(ns, vol, ino, fattr3, flags, mac, epoch0)
        if self._epoch is not None and self._epoch.stable() != epoch0:
            return -errno.ESTALE
        idx = self._find(ns, vol, ino)
        if idx < 0:
            if not insert:
                return -errno.ENOENT
            b = bucket(self.buckets, ns, vol, ino)
            e0, e1 = self._entry(b), self._entry(b ^ 1)
            if not self._live(e0):
                idx = b
            elif not self._live(e1):
                idx = b ^ 1
            else:
                idx = b if e0[8] <= e1[8] else b ^ 1
        self._gen += 1
        entry = _ENTRY.pack(
            0, epoch0 & 0xFFFFFFFF, self.table_epoch, flags | abi.ATTR_VALID,
            ns, vol, 0, ino, self._gen, fattr3,
        )  # fmt: skip
        self._write(idx, entry)
        assert self._macs is not None
        self._macs[idx * abi.MAC_SIZE : (idx + 1) * abi.MAC_SIZE] = (
            mac if mac is not None else bytes(abi.MAC_SIZE)
        )
        return idx

    def invalidate(self, ns: int, vol: int, ino: int) -> bool:
        """Invalidate the key's entry: whether it was valid (vrpc_meta_invalidate)."""
        abi.check_key(ns, vol, ino)
        idx = self._find(ns, vol, ino)
        if idx < 0:
            return False
        e = list(self._entry(idx))
        e[3] = 0
        self._write(idx, _ENTRY.pack(*e))
        return True

    def bump(self) -> None:
        """Invalidate every entry at once (vrpc_meta_bump)."""
        self.table_epoch = (self.table_epoch + 1) & 0xFFFFFFFF or 1
        self._u32[_TABLE_EPOCH_WORD] = self.table_epoch


class PyMetaReader(_Table):
    """A client's end: a read-only mapping of the table (vrpc_meta_open/lookup)."""

    def __init__(self, buf: mmap.mmap, *, epoch: EpochFile | None = None) -> None:
        if len(buf) < abi.META_HEADER_SIZE:
            raise open_error(errno.EINVAL)
        magic, major, _, header_size, attr_offset, buckets, *_ = _HEADER.unpack_from(buf)
        if magic != abi.META_MAGIC:
            raise open_error(errno.EBADMSG)
        if major != abi.ABI_MAJOR:
            raise open_error(errno.EPROTONOSUPPORT)
        try:
            need = abi.meta_size(buckets)
        except ValueError:
            raise open_error(errno.EINVAL) from None
        if header_size != abi.META_HEADER_SIZE or attr_offset != abi.META_HEADER_SIZE:
            raise open_error(errno.EINVAL)
        if len(buf) < need:
            raise open_error(errno.EINVAL)
        super().__init__(buf, buckets, epoch)
        self.vm_ns = int(_HEADER.unpack_from(buf)[8])
