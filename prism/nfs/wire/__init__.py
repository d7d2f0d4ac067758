"""NFSv3 and MOUNTv3 on the wire (RFC 1813): XDR types, codecs, and the procedure tables.

Theory of operation
-------------------
Every XDR struct or union that the 22 NFSv3 procedures and the six MOUNTv3 procedures use is a
frozen, slotted dataclass with `pack(self, p: Packer)` and `unpack(cls, u: Unpacker)`. The
server decodes arguments and encodes results; the test client does the reverse, with the same
code. There is no I/O here, and no store type: conversions between wire and store types
are the service's (`prism.nfs.convert`).

The rooms, in RFC order: `base` (handles, times, fattr3, wcc_data, sattr3, diropargs3, the
result base), `procs_1_11` (NULL .. MKNOD), `procs_12_21` (REMOVE .. COMMIT), `mount`
(MOUNT v3), `packed` (the server's pre-encoded fattr3 and directory entries) and `table`
(one row per procedure). Everything public is importable from `prism.nfs.wire`.

Shapes chosen to keep the Python side flat and obvious:

* ``post_op_attr`` is ``Fattr3 | None``, ``pre_op_attr`` is ``WccAttr | None`` and
  ``post_op_fh3`` is ``NfsFh3 | None`` (``None`` = "attributes/handle do not follow").
* ``sattr3``'s ``set_it`` unions are ``None`` (leave alone) or a value; its times are
  ``TimeHow.DONT_CHANGE``, ``TimeHow.SET_TO_SERVER_TIME`` or an ``NfsTime3`` (which *is*
  SET_TO_CLIENT_TIME). Other unions in arguments (createhow3, mknoddata3, sattrguard3) are
  flattened the same way: fields that do not apply to the discriminant are ``None``.
* Each procedure has exactly one result class ``XxxRes`` whose first field is ``status``.
  The fields of the RFC's ``resfail`` arm (``wcc_data`` / ``post_op_attr``) are always
  encoded; the other ``resok`` fields only when ``status`` is NFS3_OK, and decode to their
  defaults otherwise. ``XxxRes(status)`` is therefore a valid failure result for any
  procedure, and ``XxxRes.failed(status, args, gathered)`` is the one builder of its
  failure body (``wcc_data`` / ``post_op_attr`` of the handles ``args`` names).
* Redundant length fields are not stored: READ3resok's ``count`` and WRITE3args' ``count``
  are ``len(data)`` (exposed as a ``count`` property).
* Directory listings are tuples of ``Entry3`` / ``EntryPlus3``; the XDR linked list
  (``*nextentry``) is encoded as value-follows booleans.

Decoders accept exactly one encoding and raise only `XdrError` on hostile input: truncation,
trailing bytes (at the `decode_*` entry points), enum values outside their enums, WRITE count
> len(data), and the bounds the XDR types themselves declare (handles <= NFS3_FHSIZE, MOUNT
dirpath <= MNTPATHLEN). RFC 1813's filename3, nfspath3, WRITE data and the READ/READDIR
counts are unbounded in XDR, so they decode whatever the record holds (a record is itself
bounded); the server's own limits on them (`prism.nfs.const` MAX_NAME, MAX_PATH, MAX_READ,
MAX_WRITE) are the service's to answer: NFS3ERR_NAMETOOLONG, or a reply clamped to the
maximum, never GARBAGE_ARGS. Encoders trust the caller (our own server or a
test client that may deliberately send an over-long handle); they raise ValueError only where
XDR itself cannot represent a value (e.g. a verifier that is not 8 bytes).

`NFS3_PROCS` and `MOUNT3_PROCS` are the single tables: one row per procedure with its
argument and result types, its handler's name and its flags (writes, idempotent,
durability); decoding, encoding, dispatch, the duplicate request cache and durability are
all driven by them (`table`).
"""

from __future__ import annotations

from prism.nfs.wire.base import (
    FATTR3_SIZE,
    POST_OP_ATTR_MAX_SIZE,
    SATTR_EMPTY,
    TIME_ZERO,
    VOID,
    WCC_EMPTY,
    DirOpArgs3,
    Fattr3,
    Gathered,
    NfsFh3,
    NfsTime3,
    Sattr3,
    SetTime,
    SpecData3,
    Void,
    WccAttr,
    WccData,
    Wire,
    pack_post_op_attr,
    pack_post_op_fh3,
    pack_pre_op_attr,
    unpack_enum,
    unpack_post_op_attr,
    unpack_post_op_fh3,
    unpack_pre_op_attr,
)
from prism.nfs.wire.mount import (
    DirPath,
    ExportNode,
    Exports,
    MountBody,
    MountList,
    MountRes,
)
from prism.nfs.wire.packed import (
    EncodedEntry,
    PackedFattr3,
)
from prism.nfs.wire.procs_1_11 import (
    AccessArgs,
    AccessRes,
    CreateArgs,
    CreateRes,
    GetattrArgs,
    GetattrRes,
    LookupArgs,
    LookupRes,
    MkdirArgs,
    MkdirRes,
    MknodArgs,
    MknodRes,
    ReadArgs,
    ReadlinkArgs,
    ReadlinkRes,
    ReadRes,
    SetattrArgs,
    SetattrRes,
    SymlinkArgs,
    SymlinkRes,
    WriteArgs,
    WriteRes,
)
from prism.nfs.wire.procs_12_21 import (
    READDIR_RESOK_MAX_FIXED,
    CommitArgs,
    CommitRes,
    Entry3,
    EntryPlus3,
    FsinfoArgs,
    FsinfoRes,
    FsstatArgs,
    FsstatRes,
    LinkArgs,
    LinkRes,
    PathconfArgs,
    PathconfRes,
    ReaddirArgs,
    ReaddirplusArgs,
    ReaddirplusRes,
    ReaddirRes,
    RemoveArgs,
    RemoveRes,
    RenameArgs,
    RenameRes,
    RmdirArgs,
    RmdirRes,
)
from prism.nfs.wire.table import (
    MOUNT3_PROCS,
    NFS3_PROCS,
    Durability,
    ProcRow,
    decode_args,
    decode_as,
    decode_mount_args,
    decode_mount_result,
    decode_result,
    encode_args,
    encode_as,
    encode_mount_args,
    encode_mount_result,
    encode_result,
    error_result,
)

__all__ = [
    "FATTR3_SIZE",
    "MOUNT3_PROCS",
    "NFS3_PROCS",
    "POST_OP_ATTR_MAX_SIZE",
    "READDIR_RESOK_MAX_FIXED",
    "SATTR_EMPTY",
    "TIME_ZERO",
    "VOID",
    "WCC_EMPTY",
    "AccessArgs",
    "AccessRes",
    "CommitArgs",
    "CommitRes",
    "CreateArgs",
    "CreateRes",
    "DirOpArgs3",
    "DirPath",
    "Durability",
    "EncodedEntry",
    "Entry3",
    "EntryPlus3",
    "ExportNode",
    "Exports",
    "Fattr3",
    "FsinfoArgs",
    "FsinfoRes",
    "FsstatArgs",
    "FsstatRes",
    "Gathered",
    "GetattrArgs",
    "GetattrRes",
    "LinkArgs",
    "LinkRes",
    "LookupArgs",
    "LookupRes",
    "MkdirArgs",
    "MkdirRes",
    "MknodArgs",
    "MknodRes",
    "MountBody",
    "MountList",
    "MountRes",
    "NfsFh3",
    "NfsTime3",
    "PackedFattr3",
    "PathconfArgs",
    "PathconfRes",
    "ProcRow",
    "ReadArgs",
    "ReadRes",
    "ReaddirArgs",
    "ReaddirRes",
    "ReaddirplusArgs",
    "ReaddirplusRes",
    "ReadlinkArgs",
    "ReadlinkRes",
    "RemoveArgs",
    "RemoveRes",
    "RenameArgs",
    "RenameRes",
    "RmdirArgs",
    "RmdirRes",
    "Sattr3",
    "SetTime",
    "SetattrArgs",
    "SetattrRes",
    "SpecData3",
    "SymlinkArgs",
    "SymlinkRes",
    "Void",
    "WccAttr",
    "WccData",
    "Wire",
    "WriteArgs",
    "WriteRes",
    "decode_args",
    "decode_as",
    "decode_mount_args",
    "decode_mount_result",
    "decode_result",
    "encode_args",
    "encode_as",
    "encode_mount_args",
    "encode_mount_result",
    "encode_result",
    "error_result",
    "pack_post_op_attr",
    "pack_post_op_fh3",
    "pack_pre_op_attr",
    "unpack_enum",
    "unpack_post_op_attr",
    "unpack_post_op_fh3",
    "unpack_pre_op_attr",
]
