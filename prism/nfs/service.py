"""The NFSv3 and MOUNTv3 programs: RPC procedure tables over the store.

Theory of operation: `NfsService.program()` and `.mount_program()` return `rpc.server.Program`
tables. Each row names the procedure, its handler and its flags: `idempotent` (False sends
retransmissions through the duplicate request cache) and `modifies` (the call must be durable
before its reply leaves, so the store executor commits the batch first; an UNSTABLE WRITE is
the one modifying call that may be answered before the commit).

A handler decodes its arguments (XdrError -> GARBAGE_ARGS), then runs one closure through
the store's executor (`prism.store.executor`, inline on the event loop) that resolves the
handle, checks that the caller's address and source port may reach the handle's VM and maps
its credential through the VM's squash (`prism.access`), gathers pre-operation attributes,
performs the operation and builds the result. A `StoreError` becomes the procedure's
failure result through the one errno -> nfsstat3 mapping (`prism.nfs.status`),
carrying the wcc_data / post_op_attr that the procedure's failure arm allows.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from prism.access import (
    client_allowed,
    clients_allow,
    effective_cred,
    export_groups,
    port_allowed,
)
from prism.errors import InvalidArgument, NotFound, PermissionDenied, Stale, StoreError
from prism.nfs import types as T
from prism.nfs.const import (
    FSF3_CANSETTIME,
    FSF3_HOMOGENEOUS,
    FSF3_LINK,
    FSF3_SYMLINK,
    MAX_READ,
    MAX_READDIR,
    MAX_WRITE,
    MOUNT_PROGRAM,
    MOUNT_V3,
    NFS_PROGRAM,
    NFS_V3,
    CreateMode,
    Mount3Proc,
    MountStat3,
    Nfs3Proc,
    NfsStat3,
    StableHow,
)
from prism.nfs.handles import BadHandle, HandleCodec
from prism.nfs.status import mountstat_for, nfsstat_for
from prism.store import Store
from prism.store.executor import StoreExecutor
from prism.store.records import INODE_ATTRS, LAST_COOKIE
from prism.store.types import (
    INO_BITS,
    MAX_FILE_SIZE,
    NOBODY,
    Attr,
    Cred,
    FileType,
    ObjectId,
    SetAttr,
)
from rpc.message import AuthFlavor
from rpc.server import (
    TRANSPORT_TCP,
    TRANSPORT_UDP,
    CallContext,
    Procedure,
    Program,
    procedure_table,
)

log = logging.getLogger("prism.nfs")

OK = NfsStat3.NFS3_OK
COOKIE_VERIFIER = bytes(8)
"""Cookies are derived from names and never expire, so one constant verifier suffices."""
DOT_COOKIE, DOTDOT_COOKIE = 1, 2
READDIR_PREFERRED = 64 * 1024
ENTRY_GUESS, ENTRY_PLUS_GUESS = 40, 170
"""Typical encoded sizes of a READDIR and a READDIRPLUS entry, to size store fetches."""
ENTRY_CACHE_SIZE = 32 * 1024
"""Encoded READDIRPLUS entries kept (about 250 bytes each); the cache is emptied when full."""
UDP_MAX_IO = 32 * 1024
"""READ/WRITE/READDIR payload over UDP: a reply must fit one datagram (rpc.record's
UDP_MAX_PAYLOAD) with its headers, so FSINFO advertises this and READ/READDIR clamp to it
(Linux's knfsd uses the same 32 KiB). Fix: READ used to honour counts up to MAX_READ on UDP,
so a 64 KiB+ READ got SYSTEM_ERR because its reply did not fit a datagram."""
LINK_MAX = 65000
EXPORT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}(?:@[a-z0-9][a-z0-9_.-]{0,62})?")
"""What MNT accepts as the first path component: a VM name, or VM@SNAPSHOT."""
MAX_MOUNT_ENTRIES = 1024
"""Entries DUMP remembers (host, path); MNT beyond that still works, unrecorded."""
BINDINGS_TTL = 1.0
"""Seconds `peer_bound` reuses the VMs' client ranges it read (a rebinding reaches the
connection caps' eviction order that much later)."""


def setattr_of(sattr: T.Sattr3) -> SetAttr:
    """The store's SetAttr for a client's sattr3. An nfstime3 counts nanoseconds within its
    second, so nseconds >= 10^9 is InvalidArgument (NFS3ERR_INVAL), as in knfsd."""
    for when in (sattr.atime, sattr.mtime):
        if isinstance(when, T.NfsTime3) and when.nseconds >= 1_000_000_000:
            raise InvalidArgument(f"nfstime3 with {when.nseconds} nseconds (must be < 10^9)")
    return sattr.to_setattr()


ANONYMOUS = Cred(NOBODY, NOBODY, ())


class _Fail(Exception):
    """Abort a handler with a status (for checks that are not store errors)."""

    def __init__(self, status: NfsStat3) -> None:
        super().__init__(status.name)
        self.status = status


@dataclass(slots=True)
class Call:
    """What a handler closure needs to know about the caller. `cred` is whom the caller
    acts as: anonymous until `NfsService._oid` admits the call to a VM and maps `sent`
    (its AUTH_SYS credential, None for AUTH_NONE) through that VM's squash."""

    host: str
    sent: Cred | None
    transport: str = TRANSPORT_TCP
    port: int = 0
    cred: Cred = ANONYMOUS

    @property
    def max_read(self) -> int:
        return UDP_MAX_IO if self.transport == TRANSPORT_UDP else MAX_READ

    @property
    def max_write(self) -> int:
        return UDP_MAX_IO if self.transport == TRANSPORT_UDP else MAX_WRITE

    @property
    def max_readdir(self) -> int:
        return UDP_MAX_IO if self.transport == TRANSPORT_UDP else MAX_READDIR


def canonical_mount_path(path: bytes) -> bytes:
    """b"/vm//a/./b/" -> b"/vm/a/b": the one spelling MNT records and UMNT forgets."""
    return b"/" + b"/".join(p for p in path.split(b"/") if p and p != b".")


def cred_of(ctx: CallContext) -> Cred | None:
    """The call's AUTH_SYS credential, or None (AUTH_NONE)."""
    if ctx.flavor == AuthFlavor.AUTH_SYS and ctx.auth_sys is not None:
        a = ctx.auth_sys
        return Cred(a.uid, a.gid, tuple(a.gids))
    return None


def call_of(ctx: CallContext) -> Call:
    return Call(ctx.peer[0], cred_of(ctx), ctx.transport, ctx.peer[1])


class NfsService:
    """Shared state of the NFS and MOUNT programs: the store executor and handle codec."""

    def __init__(self, executor: StoreExecutor, *, durable_replies: bool = True) -> None:
        self.executor = executor
        self.durable_replies = durable_replies
        """False (`prism serve --async`): only COMMIT waits for durability."""
        self.store: Store = executor.store
        self.handles = HandleCodec(self.store.secret)
        self._encoded_entries: dict[tuple[int, int, int, bytes, bytes], T.EncodedEntry] = {}
        """READDIRPLUS entries by (fsid, vol, ino, name, inode record): an entry's bytes are a
        function of exactly these, so a hit is always current. Listing a directory again
        (ls, find, make) then re-encodes only what changed."""
        self.mounts: set[tuple[str, bytes]] = set()
        self._bindings: frozenset[tuple[str, ...]] = frozenset()
        self._bindings_until = -1.0
        self.time_delta = T.NfsTime3.from_ns(
            max(1, int(time.clock_getres(time.CLOCK_REALTIME) * 1e9))
        )

    def peer_bound(self, host: str) -> bool:
        """Whether `host` is bound to some VM: the transports' connection admission policy
        (`rpc.admission`), under which connections from other addresses go first."""
        now = time.monotonic()
        if now >= self._bindings_until:
            infos = self.executor.call_now(lambda s: s.list_namespaces("vm"))
            self._bindings = frozenset(info.clients for info in infos)
            self._bindings_until = now + BINDINGS_TTL
        return any(clients_allow(clients, host) for clients in self._bindings)

    # -- helpers (run on the store thread) -----------------------------------------------

    def _oid(self, s: Store, call: Call, fh: T.NfsFh3) -> ObjectId:
        try:
            oid = self.handles.decode(fh.data)
        except BadHandle:
            raise _Fail(NfsStat3.NFS3ERR_BADHANDLE) from None
        export = s.export_of(oid.ns)  # Stale if the VM is gone
        if not clients_allow(export.clients, call.host):
            raise _Fail(NfsStat3.NFS3ERR_ACCES)
        if not port_allowed(export, call.port):
            raise _Fail(NfsStat3.NFS3ERR_PERM)  # knfsd's answer to an insecure port
        call.cred = effective_cred(export, call.sent)
        return oid

    def object_of(self, s: Store, host: str, fh: bytes) -> ObjectId:
        """What handle `fh` names, if `host` may use it: the check every NFS call makes,
        for the programs that take NFS handles too (NLM). Raises BadHandle, the store's
        Stale if the VM is gone, or PermissionDenied if `host` is not bound to it."""
        try:
            return self._oid(s, Call(host, Cred(NOBODY, NOBODY, ())), T.NfsFh3(fh))
        except _Fail as exc:
            if exc.status == NfsStat3.NFS3ERR_BADHANDLE:
                raise BadHandle("not a handle of this server") from None
            raise PermissionDenied(f"{host} is not bound to this handle's VM") from None

    def fattr(self, attr: Attr) -> T.Fattr3:
        # The packed form encodes exactly like Fattr3 at a tenth of the cost.
        return cast(T.Fattr3, T.PackedFattr3(attr, attr.oid.ns))

    def _post(self, s: Store, oid: ObjectId | None) -> T.Fattr3 | None:
        if oid is None:
            return None
        try:
            return self.fattr(s.getattr(oid))
        except StoreError:
            return None

    def _pre(self, s: Store, oid: ObjectId) -> T.WccAttr | None:
        try:
            return T.WccAttr.from_attr(s.getattr(oid))
        except StoreError:
            return None

    def _wcc(self, s: Store, oid: ObjectId | None, before: T.WccAttr | None) -> T.WccData:
        return T.WccData(before, self._post(s, oid))

    def verifier(self) -> bytes:
        """The write verifier: changes when the server restarts or loses a batch."""
        return self.store.boot_id.to_bytes(8, "big")

    def fh(self, oid: ObjectId) -> T.NfsFh3:
        return T.NfsFh3(self.handles.encode(oid))

    # -- the RPC glue --------------------------------------------------------------------

    def _row(
        self,
        proc: Nfs3Proc,
        body: Callable[[Store, Call, Any], Any],
        *,
        idempotent: bool = True,
        modifies: bool = False,
    ) -> Procedure:
        codec = T.NFS3_PROCS[proc]

        def answer(s: Store, call: Call, args: Any) -> Any:
            """The procedure's result; a failure becomes its status-only result."""
            try:
                return body(s, call, args)
            except _Fail as exc:
                return codec.res(exc.status)
            except StoreError as exc:
                return codec.res(nfsstat_for(exc))

        async def handler(ctx: CallContext, data: bytes) -> bytes:
            args = T.decode_args(proc, data)
            call = call_of(ctx)
            writes = modifies and proc != Nfs3Proc.COMMIT
            if self.durable_replies:
                durable = modifies and not (
                    proc == Nfs3Proc.WRITE and args.stable == StableHow.UNSTABLE
                )
            else:
                durable = proc == Nfs3Proc.COMMIT
            try:
                result = await self.executor.call(
                    lambda s: answer(s, call, args), writes=writes, durable=durable
                )
            except StoreError as exc:  # the change could not be made durable: not done
                result = codec.res(nfsstat_for(exc))
            return T.encode_result(proc, result)

        def immediate(ctx: CallContext, data: bytes) -> bytes:
            """A call that changes nothing never waits: answer it without a coroutine."""
            args = T.decode_args(proc, data)
            call = call_of(ctx)
            return T.encode_result(proc, self.executor.call_now(lambda s: answer(s, call, args)))

        return Procedure(int(proc), proc.name, handler, idempotent, None if modifies else immediate)

    def program(self) -> Program:
        P = Nfs3Proc
        rows = [
            self._row(P.NULL, lambda s, c, a: T.Void()),
            self._row(P.GETATTR, self.getattr),
            self._row(P.SETATTR, self.setattr, idempotent=False, modifies=True),
            self._row(P.LOOKUP, self.lookup),
            self._row(P.ACCESS, self.access),
            self._row(P.READLINK, self.readlink),
            self._row(P.READ, self.read),
            self._row(P.WRITE, self.write, modifies=True),
            self._row(P.CREATE, self.create, idempotent=False, modifies=True),
            self._row(P.MKDIR, self.mkdir, idempotent=False, modifies=True),
            self._row(P.SYMLINK, self.symlink, idempotent=False, modifies=True),
            self._row(P.MKNOD, self.mknod, idempotent=False, modifies=True),
            self._row(P.REMOVE, self.remove, idempotent=False, modifies=True),
            self._row(P.RMDIR, self.rmdir, idempotent=False, modifies=True),
            self._row(P.RENAME, self.rename, idempotent=False, modifies=True),
            self._row(P.LINK, self.link, idempotent=False, modifies=True),
            self._row(P.READDIR, self.readdir),
            self._row(P.READDIRPLUS, self.readdirplus),
            self._row(P.FSSTAT, self.fsstat),
            self._row(P.FSINFO, self.fsinfo),
            self._row(P.PATHCONF, self.pathconf),
            self._row(P.COMMIT, self.commit, modifies=True),
        ]
        return Program(NFS_PROGRAM, "nfs", {NFS_V3: procedure_table(rows)})

    # -- procedures ----------------------------------------------------------------------

    def getattr(self, s: Store, call: Call, a: T.GetattrArgs) -> T.GetattrRes:
        oid = self._oid(s, call, a.object)
        return T.GetattrRes(OK, self.fattr(s.getattr(oid)))

    def setattr(self, s: Store, call: Call, a: T.SetattrArgs) -> T.SetattrRes:
        oid = self._oid(s, call, a.object)
        before = self._pre(s, oid)
        try:
            guard = a.guard.to_ns() if a.guard is not None else None
            attr = s.setattr(oid, setattr_of(a.new_attributes), call.cred, guard_ctime_ns=guard)
        except StoreError as exc:
            return T.SetattrRes(nfsstat_for(exc), self._wcc(s, oid, before))
        return T.SetattrRes(OK, T.WccData(before, self.fattr(attr)))

    def lookup(self, s: Store, call: Call, a: T.LookupArgs) -> T.LookupRes:
        dir_oid = self._oid(s, call, a.what.dir)
        try:
            found = s.lookup_in(dir_oid, a.what.name, call.cred)
        except StoreError as exc:
            return T.LookupRes(nfsstat_for(exc), dir_attributes=self._post(s, dir_oid))
        return T.LookupRes(
            OK, self.fh(found.attr.oid), self.fattr(found.attr), self.fattr(found.dir)
        )

    def access(self, s: Store, call: Call, a: T.AccessArgs) -> T.AccessRes:
        oid = self._oid(s, call, a.object)
        granted = s.access(oid, call.cred, a.access)
        return T.AccessRes(OK, self._post(s, oid), granted)

    def readlink(self, s: Store, call: Call, a: T.ReadlinkArgs) -> T.ReadlinkRes:
        oid = self._oid(s, call, a.symlink)
        try:
            target = s.readlink(oid)
        except StoreError as exc:
            return T.ReadlinkRes(nfsstat_for(exc), self._post(s, oid))
        return T.ReadlinkRes(OK, self._post(s, oid), target)

    def read(self, s: Store, call: Call, a: T.ReadArgs) -> T.ReadRes:
        oid = self._oid(s, call, a.file)
        try:
            got = s.read_attr(oid, a.offset, min(a.count, call.max_read), call.cred)
        except StoreError as exc:
            return T.ReadRes(nfsstat_for(exc), self._post(s, oid))
        return T.ReadRes(OK, self.fattr(got.attr), got.eof, got.data)

    def write(self, s: Store, call: Call, a: T.WriteArgs) -> T.WriteRes:
        oid = self._oid(s, call, a.file)
        before = self._pre(s, oid)
        data = a.data if len(a.data) <= MAX_WRITE else a.data[:MAX_WRITE]  # a short write
        try:
            attr = s.write(oid, a.offset, data, call.cred)
        except StoreError as exc:
            return T.WriteRes(nfsstat_for(exc), self._wcc(s, oid, before))
        # With --async nothing is durable before COMMIT, and the reply says so.
        unstable = a.stable == StableHow.UNSTABLE or not self.durable_replies
        committed = StableHow.UNSTABLE if unstable else StableHow.FILE_SYNC
        return T.WriteRes(
            OK, T.WccData(before, self.fattr(attr)), len(data), committed, self.verifier()
        )

    def _made(
        self,
        s: Store,
        res: type[T.CreateRes],
        dir_oid: ObjectId,
        before: T.WccAttr | None,
        make: Callable[[], Attr],
    ) -> T.CreateRes:
        try:
            attr = make()
        except StoreError as exc:
            return res(nfsstat_for(exc), dir_wcc=self._wcc(s, dir_oid, before))
        return res(OK, self.fh(attr.oid), self.fattr(attr), self._wcc(s, dir_oid, before))

    def create(self, s: Store, call: Call, a: T.CreateArgs) -> T.CreateRes:
        dir_oid = self._oid(s, call, a.where.dir)
        before = self._pre(s, dir_oid)
        if s.namespace_by_id(dir_oid.ns).readonly:
            # Fix: CREATE of an existing name (UNCHECKED, or an EXCLUSIVE retry) changes
            # nothing, so the store answered OK even in a snapshot; like every other
            # modifying procedure on a read-only export it is NFS3ERR_ROFS (as in knfsd).
            return T.CreateRes(NfsStat3.NFS3ERR_ROFS, dir_wcc=self._wcc(s, dir_oid, before))

        def make() -> Attr:
            sattr = setattr_of(a.obj_attributes or T.SATTR_EMPTY)
            mode = sattr.mode if sattr.mode is not None else 0o644
            return s.create(
                dir_oid,
                a.where.name,
                mode,
                call.cred,
                exclusive=a.verf if a.mode == CreateMode.EXCLUSIVE else None,
                guarded=a.mode == CreateMode.GUARDED,
                sattr=sattr if a.mode != CreateMode.EXCLUSIVE else None,
            )

        return self._made(s, T.CreateRes, dir_oid, before, make)

    def mkdir(self, s: Store, call: Call, a: T.MkdirArgs) -> T.CreateRes:
        dir_oid = self._oid(s, call, a.where.dir)
        before = self._pre(s, dir_oid)

        def make() -> Attr:
            sattr = setattr_of(a.attributes)
            mode = sattr.mode if sattr.mode is not None else 0o755
            return s.mkdir(dir_oid, a.where.name, mode, call.cred, sattr=sattr)

        return self._made(s, T.MkdirRes, dir_oid, before, make)

    def symlink(self, s: Store, call: Call, a: T.SymlinkArgs) -> T.CreateRes:
        dir_oid = self._oid(s, call, a.where.dir)
        before = self._pre(s, dir_oid)
        return self._made(
            s,
            T.SymlinkRes,
            dir_oid,
            before,
            lambda: s.symlink(
                dir_oid,
                a.where.name,
                a.symlink_data,
                call.cred,
                sattr=setattr_of(a.symlink_attributes),
            ),
        )

    def mknod(self, s: Store, call: Call, a: T.MknodArgs) -> T.CreateRes:
        dir_oid = self._oid(s, call, a.where.dir)
        before = self._pre(s, dir_oid)
        if a.type not in (FileType.CHR, FileType.BLK, FileType.SOCK, FileType.FIFO):
            return T.MknodRes(NfsStat3.NFS3ERR_BADTYPE, dir_wcc=self._wcc(s, dir_oid, before))
        spec = a.spec or T.SpecData3()

        def make() -> Attr:
            sattr = setattr_of(a.attributes or T.SATTR_EMPTY)
            mode = sattr.mode if sattr.mode is not None else 0o644
            rdev = (spec.specdata1, spec.specdata2)
            return s.mknod(dir_oid, a.where.name, a.type, mode, call.cred, rdev=rdev, sattr=sattr)

        return self._made(s, T.MknodRes, dir_oid, before, make)

    def _removal(
        self, s: Store, call: Call, where: T.DirOpArgs3, res: type[T.RemoveRes], fn: Callable
    ) -> T.RemoveRes:
        dir_oid = self._oid(s, call, where.dir)
        before = self._pre(s, dir_oid)
        try:
            fn(dir_oid, where.name, call.cred)
        except StoreError as exc:
            return res(nfsstat_for(exc), self._wcc(s, dir_oid, before))
        return res(OK, self._wcc(s, dir_oid, before))

    def remove(self, s: Store, call: Call, a: T.RemoveArgs) -> T.RemoveRes:
        return self._removal(s, call, a.object, T.RemoveRes, s.remove)

    def rmdir(self, s: Store, call: Call, a: T.RmdirArgs) -> T.RemoveRes:
        return self._removal(s, call, a.object, T.RmdirRes, s.rmdir)

    def rename(self, s: Store, call: Call, a: T.RenameArgs) -> T.RenameRes:
        src = self._oid(s, call, a.from_.dir)
        dst = self._oid(s, call, a.to.dir)
        src_before, dst_before = self._pre(s, src), self._pre(s, dst)
        try:
            s.rename(src, a.from_.name, dst, a.to.name, call.cred)
            status = OK
        except StoreError as exc:
            status = nfsstat_for(exc)
        return T.RenameRes(status, self._wcc(s, src, src_before), self._wcc(s, dst, dst_before))

    def link(self, s: Store, call: Call, a: T.LinkArgs) -> T.LinkRes:
        oid = self._oid(s, call, a.file)
        dir_oid = self._oid(s, call, a.link.dir)
        before = self._pre(s, dir_oid)
        try:
            attr = s.link(oid, dir_oid, a.link.name, call.cred)
        except StoreError as exc:
            return T.LinkRes(nfsstat_for(exc), self._post(s, oid), self._wcc(s, dir_oid, before))
        return T.LinkRes(OK, self.fattr(attr), self._wcc(s, dir_oid, before))

    def _listing(
        self, s: Store, call: Call, fh: T.NfsFh3, cookie: int, budget: int, plus: bool
    ) -> tuple[ObjectId, list[Any], bool]:
        """Entries after `cookie` that fit in `budget` reply bytes ('.' and '..' first)."""
        dir_oid = self._oid(s, call, fh)
        dir_attr = s.getattr(dir_oid)
        if dir_attr.type != FileType.DIR:
            raise _Fail(NfsStat3.NFS3ERR_NOTDIR)
        if cookie > LAST_COOKIE:
            raise _Fail(NfsStat3.NFS3ERR_BAD_COOKIE)  # no entry was ever given this cookie
        entries: list[Any] = []
        used = 0

        def fits(entry: Any) -> bool:
            nonlocal used
            size = entry.wire_size()
            if used + size > budget:
                return False
            used += size
            entries.append(entry)
            return True

        def make(name: bytes, attr: Attr, c: int) -> Any:
            if plus:
                return T.EncodedEntry.entryplus3(
                    attr.fileid,
                    name,
                    c,
                    T.PackedFattr3(attr, attr.oid.ns),
                    self.handles.encode(attr.oid),
                )
            return T.EncodedEntry.entry3(attr.fileid, name, c)

        if cookie < DOT_COOKIE and not fits(make(b".", dir_attr, DOT_COOKIE)):
            raise _Fail(NfsStat3.NFS3ERR_TOOSMALL)
        if cookie < DOTDOT_COOKIE:
            parent = s.lookup(dir_oid, b"..")
            if not fits(make(b"..", parent, DOTDOT_COOKIE)):
                return dir_oid, entries, False
        after = cookie
        guess = ENTRY_PLUS_GUESS if plus else ENTRY_GUESS
        ns = dir_oid.ns
        encode_handle = self.handles.encode_ids
        inode_attrs = INODE_ATTRS.unpack_from
        encoded = self._encoded_entries
        while True:
            # What is left of the page holds about this many entries: fetch just those.
            limit = max(8, min(1024, (budget - used) // guess + 8))
            listing = s.readdir_raw(dir_oid, after, call.cred, limit=limit, attrs=plus)
            batch, eof = listing.entries, listing.eof
            for c, name, vol, ino, record in batch:
                fileid = (vol << INO_BITS) | ino
                if plus:
                    if record is None:
                        continue
                    key = (ns, vol, ino, name, record)
                    item = encoded.get(key)
                    if item is None:
                        item = T.EncodedEntry.entryplus3_of_record(
                            fileid,
                            name,
                            c,
                            ns,
                            inode_attrs(record),
                            encode_handle(ns, vol, ino),
                        )
                        if len(encoded) >= ENTRY_CACHE_SIZE:
                            encoded.clear()
                        encoded[key] = item
                else:
                    item = T.EncodedEntry.entry3(fileid, name, c)
                size = 4 + len(item.raw)  # (`fits` and `wire_size` inlined: READDIR's loop)
                if used + size > budget:
                    if not entries:
                        raise _Fail(NfsStat3.NFS3ERR_TOOSMALL)
                    return dir_oid, entries, False
                used += size
                entries.append(item)
                after = c
            if eof:
                return dir_oid, entries, True

    def readdir(self, s: Store, call: Call, a: T.ReaddirArgs) -> T.ReaddirRes:
        budget = min(a.count, call.max_readdir) - T.READDIR_RESOK_MAX_FIXED
        try:
            dir_oid, entries, eof = self._listing(s, call, a.dir, a.cookie, budget, False)
        except StoreError as exc:
            return T.ReaddirRes(nfsstat_for(exc), self._post_fh(s, call, a.dir))
        return T.ReaddirRes(OK, self._post(s, dir_oid), COOKIE_VERIFIER, tuple(entries), eof)

    def readdirplus(self, s: Store, call: Call, a: T.ReaddirplusArgs) -> T.ReaddirplusRes:
        budget = min(a.maxcount, call.max_readdir) - T.READDIR_RESOK_MAX_FIXED
        try:
            dir_oid, entries, eof = self._listing(s, call, a.dir, a.cookie, budget, True)
        except StoreError as exc:
            return T.ReaddirplusRes(nfsstat_for(exc), self._post_fh(s, call, a.dir))
        return T.ReaddirplusRes(OK, self._post(s, dir_oid), COOKIE_VERIFIER, tuple(entries), eof)

    def _post_fh(self, s: Store, call: Call, fh: T.NfsFh3) -> T.Fattr3 | None:
        try:
            return self._post(s, self._oid(s, call, fh))
        except (StoreError, _Fail):
            return None

    def fsstat(self, s: Store, call: Call, a: T.FsstatArgs) -> T.FsstatRes:
        oid = self._oid(s, call, a.fsroot)
        st = s.fsstat(oid.ns)
        return T.FsstatRes(
            OK,
            self._post(s, oid),
            st.total_bytes,
            st.free_bytes,
            st.avail_bytes,
            st.total_files,
            st.free_files,
            st.free_files,
            0,
        )

    def fsinfo(self, s: Store, call: Call, a: T.FsinfoArgs) -> T.FsinfoRes:
        oid = self._oid(s, call, a.fsroot)
        return T.FsinfoRes(
            OK,
            self._post(s, oid),
            rtmax=call.max_read,
            rtpref=call.max_read,
            rtmult=4096,
            wtmax=call.max_write,
            wtpref=call.max_write,
            wtmult=4096,
            dtpref=min(READDIR_PREFERRED, call.max_read),
            maxfilesize=MAX_FILE_SIZE,
            time_delta=self.time_delta,
            properties=FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        )

    def pathconf(self, s: Store, call: Call, a: T.PathconfArgs) -> T.PathconfRes:
        oid = self._oid(s, call, a.object)
        return T.PathconfRes(
            OK,
            self._post(s, oid),
            linkmax=LINK_MAX,
            name_max=255,
            no_trunc=True,
            chown_restricted=True,
            case_insensitive=False,
            case_preserving=True,
        )

    def commit(self, s: Store, call: Call, a: T.CommitArgs) -> T.CommitRes:
        oid = self._oid(s, call, a.file)
        before = self._pre(s, oid)
        # Durability comes from the executor: this call is `durable`, so its reply waits for
        # the commit of the open batch, which holds every earlier UNSTABLE write.
        return T.CommitRes(OK, self._wcc(s, oid, before), self.verifier())

    # -- MOUNT ---------------------------------------------------------------------------

    def mount_program(self) -> Program:
        M = Mount3Proc

        def row(proc: Mount3Proc, fn: Callable[[CallContext, Any], Any], **kw: Any) -> Procedure:
            async def handler(ctx: CallContext, data: bytes) -> bytes:
                args = T.decode_mount_args(proc, data)
                result = await fn(ctx, args)
                return T.encode_mount_result(proc, result)

            return Procedure(int(proc), proc.name, handler, **kw)

        rows = [
            row(M.NULL, self._mnt_null),
            row(M.MNT, self._mnt),
            row(M.DUMP, self._mnt_dump),
            row(M.UMNT, self._umnt),
            row(M.UMNTALL, self._umntall),
            row(M.EXPORT, self._export),
        ]
        return Program(
            MOUNT_PROGRAM, "mount", {1: procedure_table(rows), MOUNT_V3: procedure_table(rows)}
        )

    async def _mnt_null(self, ctx: CallContext, args: Any) -> T.Void:
        return T.Void()

    async def _mnt(self, ctx: CallContext, args: T.DirPath) -> T.MountRes:
        host, port = ctx.peer
        path = args.path

        def run(s: Store) -> T.MountRes:
            try:
                text = path.decode()
            except UnicodeDecodeError:
                return T.MountRes(MountStat3.MNT3ERR_NOENT)
            name, _, rest = text.strip("/").partition("/")
            if not EXPORT_NAME.fullmatch(name):
                # Fix: an empty or over-long name ("/", "", 600 bytes) reached LMDB as a key
                # it cannot hold and MNT answered SYSTEM_ERR; no VM has such a name.
                log.info("MNT %r from %s refused: not a VM name", text[:100], host)
                return T.MountRes(MountStat3.MNT3ERR_NOENT)
            try:
                info = s.namespace(name)
                if not client_allowed(info, host):
                    raise PermissionDenied(f"{host} is not bound to {name}")
                if not port_allowed(info.export, port):
                    raise PermissionDenied(
                        f"{host} called from unprivileged port {port} and {name} is secure "
                        f"(mount as root, or allow it with `prism vm set {name} --insecure`)"
                    )
                attr = s.resolve(info.id, "/" + rest)
                if attr.type != FileType.DIR:
                    return T.MountRes(MountStat3.MNT3ERR_NOTDIR)
            except (StoreError, NotFound, Stale) as exc:
                log.info("MNT %s from %s refused: %s", text, host, exc)
                return T.MountRes(mountstat_for(exc))
            # DUMP is advisory: record the path in one spelling per directory, and a bounded
            # number of them, so a client cannot grow the table with "/vm//x/./" variants.
            if len(self.mounts) < MAX_MOUNT_ENTRIES:
                self.mounts.add((host, canonical_mount_path(path)))
            return T.MountRes(
                MountStat3.MNT3_OK,
                self.fh(attr.oid),
                (int(AuthFlavor.AUTH_SYS), int(AuthFlavor.AUTH_NONE)),
            )

        return await self.executor.call(run)

    async def _mnt_dump(self, ctx: CallContext, args: Any) -> T.MountList:
        return T.MountList(tuple(T.MountBody(h.encode(), p) for h, p in sorted(self.mounts)))

    async def _umnt(self, ctx: CallContext, args: T.DirPath) -> T.Void:
        self.mounts.discard((ctx.peer[0], canonical_mount_path(args.path)))
        return T.Void()

    async def _umntall(self, ctx: CallContext, args: Any) -> T.Void:
        self.mounts = {m for m in self.mounts if m[0] != ctx.peer[0]}
        return T.Void()

    async def _export(self, ctx: CallContext, args: Any) -> T.Exports:
        """The exports the caller may mount (VMs and their snapshots bound to its address),
        nothing to an address bound to no VM: the list of VMs and of their client ranges
        is not for every prober to read."""
        host = ctx.peer[0]
        infos = await self.executor.call(lambda s: s.list_namespaces())
        return T.Exports(
            tuple(
                T.ExportNode(
                    ("/" + info.name).encode(), tuple(g.encode() for g in export_groups(info))
                )
                for info in infos
                if client_allowed(info, host)
            )
        )
