"""VRPC attribute tables: one sealed, read-only-to-clients memfd per VM, two backends.

Theory of operation (design section 7). The server creates a VM's table when its first
ATTACH_META channel attaches (`new_table`): a memfd it sizes, maps read-write, then seals with
`F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, so every later mapping,
`write()` or resize of that fd fails (clients get it by SCM_RIGHTS and map it read-only,
`map_table`) while the server's own mapping stays writable. Entries are seqlocked XDR `fattr3`
bytes keyed by the handle's `(ns, vol, ino)`, stamped with the store epoch
(`prism.store.epoch`) and the table epoch: a lookup returns them only while they are exactly
what a GETATTR would answer (vrpc_meta.c's header comment says why).

`meta_backend(name)` gives the writer and reader classes of the C backend (`vrpc._native`,
`vrpc_meta_*`) or of the pure-Python reference (`vrpc.pymeta`); both have the same methods,
results and errors, and every table test runs on both.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any, Protocol

from prism.store.epoch import EpochFile
from vrpc import abi
from vrpc.native import _native, backend
from vrpc.pymeta import MetaOpenError, PyMetaReader, PyMetaWriter, open_error

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)  # Linux 5.1; absent in 3.11
TABLE_SEALS = F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

__all__ = ["MetaOpenError", "MetaReader", "MetaWriter", "Table", "map_table", "new_table"]


class MetaReader(Protocol):
    buckets: int
    vm_ns: int

    def lookup(self, ns: int, vol: int, ino: int, mac: bytes | None = None) -> bytes | None:
        """The key's fresh fattr3 (84 bytes), or None."""

    def release(self) -> None: ...


class MetaWriter(MetaReader, Protocol):
    table_epoch: int

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
        """The bucket index written, -ENOENT (absent, insert False) or -ESTALE (epoch moved)."""

    def invalidate(self, ns: int, vol: int, ino: int) -> bool: ...

    def bump(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Table:
    """A VM's table as the server holds it: `fd` is the sealed memfd passed to clients."""

    fd: int
    map: mmap.mmap

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def new_table(buckets: int, name: str = "prism-vrpc-meta") -> Table:
    """A zeroed memfd of a table of `buckets` entries, mapped read-write here, then sealed so
    that nobody can map it writable, write it or resize it any more (server side)."""
    size = abi.meta_size(buckets)
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, TABLE_SEALS)
        except BaseException:
            buf.close()
            raise
    except BaseException:
        os.close(fd)
        raise
    return Table(fd, buf)


def map_table(fd: int) -> mmap.mmap:
    """Map a table received from the server read-only (client side), whole."""
    size = os.fstat(fd).st_size
    if size < abi.META_HEADER_SIZE:
        raise open_error(errno.EINVAL)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)


def _check(result: int) -> int:
    if result < 0 and result not in (-errno.ENOENT, -errno.ESTALE):
        raise OSError(-result, os.strerror(-result))
    return result


class NativeMetaWriter:
    """The server's end over `vrpc_meta_*` (C); see `vrpc.pymeta.PyMetaWriter`."""

    def __init__(
        self,
        buf: mmap.mmap,
        *,
        buckets: int,
        vm_ns: int,
        boot_id: int = 0,
        epoch: EpochFile | None = None,
    ) -> None:
        ffi, lib = _native.ffi, _native.lib
        size = abi.meta_size(buckets)
        if len(buf) < size:
            raise ValueError(f"a table of {buckets} entries needs {size} bytes, not {len(buf)}")
        self._ptr = ffi.from_buffer("char[]", buf, require_writable=True)
        self._epoch = epoch  # keeps the mapping alive
        self._eptr = (
            ffi.from_buffer("char[]", epoch.map, require_writable=False)
            if epoch is not None
            else ffi.NULL
        )
        self._macs = ffi.new("uint8_t[]", buckets * abi.MAC_SIZE)
        self._m = ffi.new("struct vrpc_meta *")
        self._out = ffi.new("uint8_t[]", abi.FATTR3_SIZE)
        if lib.vrpc_meta_init(self._m, self._ptr, len(buf), buckets, vm_ns, boot_id,
                              self._eptr, self._macs) < 0:  # fmt: skip
            raise ValueError(f"cannot lay out a table of {buckets} entries in {len(buf)} bytes")
        self.buckets = buckets
        self.vm_ns = vm_ns

    @property
    def table_epoch(self) -> int:
        return int(self._m.table_epoch)

    @property
    def cdata(self) -> Any:
        """The `struct vrpc_meta *` the C fast path reads (`NativeServerRing.drain_fast`)."""
        return self._m

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
        abi.check_publish(ns, vol, ino, fattr3, flags, mac, epoch0)
        return _check(
            _native.lib.vrpc_meta_publish(
                self._m, ns, vol, ino, fattr3, flags,
                mac if mac is not None else _native.ffi.NULL, epoch0, int(insert),
            )
        )  # fmt: skip

    def invalidate(self, ns: int, vol: int, ino: int) -> bool:
        abi.check_key(ns, vol, ino)
        return _native.lib.vrpc_meta_invalidate(self._m, ns, vol, ino) == 1

    def bump(self) -> None:
        _native.lib.vrpc_meta_bump(self._m)

    def lookup(self, ns: int, vol: int, ino: int, mac: bytes | None = None) -> bytes | None:
        if mac is not None and len(mac) != abi.MAC_SIZE:
            return None
        got = _native.lib.vrpc_meta_lookup(
            self._m, ns, vol, ino, self._out, mac if mac is not None else _native.ffi.NULL
        )
        return _native.ffi.buffer(self._out)[:] if got >= 0 else None

    def release(self) -> None:
        _native.ffi.release(self._ptr)
        if self._eptr != _native.ffi.NULL:
            _native.ffi.release(self._eptr)


class NativeMetaReader:
    """A client's end over `vrpc_meta_open/lookup` (C); see `vrpc.pymeta.PyMetaReader`."""

    def __init__(self, buf: mmap.mmap, *, epoch: EpochFile | None = None) -> None:
        ffi, lib = _native.ffi, _native.lib
        self._buf = buf
        self._ptr = ffi.from_buffer("char[]", buf, require_writable=False)
        self._epoch = epoch
        eptr = ffi.from_buffer("char[]", epoch.map) if epoch is not None else ffi.NULL
        self._eptr = eptr
        self._m = ffi.new("struct vrpc_meta *")
        self._out = ffi.new("uint8_t[]", abi.FATTR3_SIZE)
        result = lib.vrpc_meta_open(
            self._m, self._ptr, len(buf), eptr, len(epoch.map) if epoch is not None else 0
        )
        if result < 0:
            ffi.release(self._ptr)
            raise open_error(-result)
        self.buckets = int(self._m.buckets)
        self.vm_ns = int(self._m.vm_ns)
        self._lookup = lib.vrpc_meta_lookup
        self._null = ffi.NULL
        self._result = ffi.buffer(self._out)

    def lookup(self, ns: int, vol: int, ino: int, mac: bytes | None = None) -> bytes | None:
        if self._lookup(self._m, ns, vol, ino, self._out, self._null) < 0:
            return None
        return self._result[:]

    def release(self) -> None:
        _native.ffi.release(self._ptr)
        if self._eptr != _native.ffi.NULL:
            _native.ffi.release(self._eptr)


@dataclass(frozen=True, slots=True)
class MetaBackend:
    name: str
    writer: Any
    reader: Any


def meta_backend(name: str | None = None) -> MetaBackend:
    """The table backend called `name` ("native" or "python"), default the ring's."""
    name = backend(name).name  # same choice and errors as the ring
    if name == "native":
        return MetaBackend("native", NativeMetaWriter, NativeMetaReader)
    return MetaBackend("python", PyMetaWriter, PyMetaReader)
