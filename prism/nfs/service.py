"""The NFSv3 and MOUNTv3 programs: the procedure tables' handlers over the store.

Theory of operation: `NfsService.program()` and `.mount_program()` turn the wire layer's
procedure tables (`prism.nfs.wire.NFS3_PROCS`, `MOUNT3_PROCS`) into `rpc.server.Program`s:
each row gives the codec, the handler (a method of `NfsService` named by the row) and the
flags: `writes` (a write transaction), `idempotent` (False sends retransmissions through the
duplicate request cache) and `durability` (whether the reply waits for the commit of the
store's batch; an UNSTABLE WRITE is the one modifying call that may be answered first).

A handler's arguments are decoded first (XdrError -> GARBAGE_ARGS); its body then runs through
the store's executor (`prism.store.executor`, inline on the event loop): it resolves each
handle, checking that the caller's address and source port may reach the handle's VM and
mapping its credential through the VM's squash (`prism.access`), then makes one store call
(`prism.store.api.FileStore`), which answers everything the OK result needs from one
transaction: the attributes before and after a change, the object made, the data read. A
failure is raised, never built by the body (as in go-nfs): a `StoreError` (through the one
errno -> nfsstat3 mapping, `prism.nfs.status`) or an `NfsError` becomes the procedure's
failure result, whose body (wcc_data / post_op_attr) its result type builds (`XxxRes.failed`)
from the attributes the failed store call had read (`StoreError.attrs`; a failure changes
nothing, so they hold before and after). A handle that cannot be used is answered with its
status alone.

Accounting: a call admitted to a VM (`_oid`) is counted in that VM's `VmStats` (calls by
procedure, bytes READ returned and WRITE accepted), by the VM's id, so the figures survive
a rename; the metrics endpoint (`prism.metrics`) reads them. Calls that no VM admitted
(a bad or stale handle, a refused client, NULL) are counted by the dispatcher only.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from prism.access import (
    client_allowed,
    clients_allow,
    effective_cred,
    export_groups,
    port_allowed,
)
from prism.errors import NotADirectory, NotFound, PermissionDenied, ReadOnly, Stale, StoreError
from prism.limits import NAME_MAX, NLINK_MAX, VM_NAME_PATTERN
from prism.nfs import wire as T
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
    Ftype3,
    Mount3Proc,
    MountStat3,
    Nfs3Proc,
    NfsStat3,
    StableHow,
)
from prism.nfs.convert import fattr3, file_type, packed_fattr3, setattr_of, wcc_attr
from prism.nfs.handles import MAC_SIZE, BadHandle, HandleCodec
from prism.nfs.status import mountstat_for, nfsstat_for
from prism.store.api import LAST_COOKIE, FileStore, Made, Wcc, record_attrs
from prism.store.executor import StoreExecutor
from prism.store.types import (
    ACCESS_DELETE,
    ACCESS_EXTEND,
    ACCESS_MODIFY,
    INO_BITS,
    MAX_FILE_SIZE,
    NOBODY,
    Attr,
    Cred,
    FileType,
    ObjectId,
)
from rpc.message import AuthFlavor, AuthSys
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
Durability = T.Durability
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
UDP_MAX_PAYLOAD) with its headers, so FSINFO advertises this and READ/READDIR clamp every
count to it (Linux's knfsd uses the same 32 KiB): no count a client sends can make a reply
that does not fit."""
EXPORT_NAME = re.compile(rf"{VM_NAME_PATTERN}(?:@{VM_NAME_PATTERN})?")
"""What MNT accepts as the first path component: a VM name, or VM@SNAPSHOT."""
MAX_MOUNT_ENTRIES = 1024
"""Entries DUMP remembers (host, path); MNT beyond that still works, unrecorded."""
BINDINGS_TTL = 1.0
"""Seconds `peer_bound` reuses the VMs' client ranges it read (a rebinding reaches the
connection caps' eviction order that much later)."""
MKNOD_TYPES = (Ftype3.CHR, Ftype3.BLK, Ftype3.SOCK, Ftype3.FIFO)
ACCESS_WRITES = ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
"""ACCESS bits a read-only export never grants (as knfsd's `ro`)."""

ANONYMOUS = Cred(NOBODY, NOBODY, ())
CREDS_SIZE = 4096
"""AUTH_SYS credentials `cred_of` remembers as Creds (emptied when full)."""
_CREDS: dict[int, tuple[AuthSys, Cred]] = {}
"""Creds by the id of the AuthSys they were made of (held, so the id stays its own):
`rpc.message.decode_call` hands out one AuthSys per distinct credential."""


class NfsError(Exception):
    """A procedure's failure with its status, answered with the procedure's failure result.
    `bare` answers the status alone: a handle that cannot be used (nothing about the
    objects of a VM the caller may not reach is told) and READDIR's checks of its
    arguments. `error` is the store's error behind it, if any."""

    def __init__(
        self, status: NfsStat3, *, bare: bool = False, error: StoreError | None = None
    ) -> None:
        super().__init__(status.name)
        self.status = status
        self.bare = bare
        self.error = error


@dataclass(slots=True)
class Call:
    """What a handler body knows about the caller, and what it gathered. `cred` is whom the
    caller acts as: anonymous until `NfsService._oid` admits the call to a VM and maps
    `sent` (its AUTH_SYS credential, None for AUTH_NONE) through that VM's squash.
    `objects` are the handles admitted (by handle bytes), `changing` the objects the call
    changes (whose failure bodies carry wcc data)."""

    host: str
    sent: Cred | None
    transport: str = TRANSPORT_TCP
    port: int = 0
    cred: Cred = ANONYMOUS
    read_only: bool = False
    """The VM `_oid` admitted the call to is exported read-only (`prism vm set --read-only`)."""
    objects: dict[bytes, ObjectId] = field(default_factory=dict)
    changing: set[ObjectId] = field(default_factory=set)
    vm: int | None = None
    """The VM a VRPC channel is bound to: its calls reach that VM's handles only."""
    account: VmStats | None = None
    """The figures of the VM that admitted the call (None until one has)."""

    @property
    def max_read(self) -> int:
        return UDP_MAX_IO if self.transport == TRANSPORT_UDP else MAX_READ

    @property
    def max_write(self) -> int:
        return UDP_MAX_IO if self.transport == TRANSPORT_UDP else MAX_WRITE

    @property
    def max_readdir(self) -> int:
        return UDP_MAX_IO if self.transport == TRANSPORT_UDP else MAX_READDIR


@dataclass(slots=True)
class VmStats:
    """What the NFS calls admitted to one VM did: `calls` by NFSv3 procedure number, the
    bytes READ returned and the bytes WRITE accepted. Plain counters, bumped on the event
    loop's thread."""

    calls: list[int] = field(default_factory=lambda: [0] * (max(Nfs3Proc) + 1))
    read_bytes: int = 0
    written_bytes: int = 0


def canonical_mount_path(path: bytes) -> bytes:
    """b"/vm//a/./b/" -> b"/vm/a/b": the one spelling MNT records and UMNT forgets."""
    return b"/" + b"/".join(p for p in path.split(b"/") if p and p != b".")


@dataclass(frozen=True, slots=True)
class MountRecord:
    """One MNT that DUMP remembers: `host` mounted `rest` (b"" or b"/a/b") of namespace `ns`
    (a VM or a snapshot, by id: DUMP shows its current name, and forgets it once it is
    removed) by the path `asked` (canonical), which UMNT forgets after a rename too."""

    host: str
    ns: int
    rest: bytes
    asked: bytes

    @classmethod
    def of(cls, host: str, ns: int, path: bytes) -> MountRecord:
        asked = canonical_mount_path(path)
        _, slash, rest = asked[1:].partition(b"/")
        return cls(host, ns, slash + rest, asked)

    def path(self, names: dict[int, str]) -> bytes:
        """The directory as DUMP shows it, under the namespace's name in `names`."""
        return b"/" + names[self.ns].encode() + self.rest


def cred_of(ctx: CallContext) -> Cred | None:
    """The call's AUTH_SYS credential, or None (AUTH_NONE)."""
    a = ctx.auth_sys
    if a is None or ctx.flavor != AuthFlavor.AUTH_SYS:
        return None
    known = _CREDS.get(id(a))
    if known is not None and known[0] is a:
        return known[1]
    if len(_CREDS) >= CREDS_SIZE:
        _CREDS.clear()
    cred = Cred(a.uid, a.gid, tuple(a.gids))
    _CREDS[id(a)] = (a, cred)
    return cred


def call_of(ctx: CallContext) -> Call:
    return Call(ctx.peer[0], cred_of(ctx), ctx.transport, ctx.peer[1], vm=ctx.binding)


def post_attr(s: FileStore, oid: ObjectId) -> T.Fattr3 | None:
    """post_op_attr of `oid`: its attributes now, or None if they cannot be read."""
    try:
        return fattr3(s.getattr(oid))
    except StoreError:
        return None


def wcc_data(wcc: Wcc) -> T.WccData:
    """The store's attributes around a change as wcc_data."""
    return T.WccData(None if wcc.before is None else wcc_attr(wcc.before), fattr3(wcc.after))


def unchanged(attr: Attr | None) -> T.WccData:
    """wcc_data of an object a call left as it was (`attr`: None if unknown)."""
    return T.WCC_EMPTY if attr is None else T.WccData(wcc_attr(attr), fattr3(attr))


@dataclass(frozen=True, slots=True)
class Gathered:
    """`wire.Gathered` over one failed call: a failure body tells only of handles it
    admitted. A failure changed nothing, so an object's attributes are the same before and
    after it: those the store read before failing (`StoreError.attrs`), else read now."""

    s: FileStore
    call: Call
    attrs: dict[ObjectId, Attr]

    def _attr(self, fh: T.NfsFh3) -> Attr | None:
        oid = self.call.objects.get(fh.data)
        if oid is None:
            return None
        attr = self.attrs.get(oid)
        if attr is None:  # the call failed before the store read the object
            try:
                attr = self.s.getattr(oid)
            except StoreError:
                return None
        return attr

    def post(self, fh: T.NfsFh3) -> T.Fattr3 | None:
        attr = self._attr(fh)
        return None if attr is None else fattr3(attr)

    def wcc(self, fh: T.NfsFh3) -> T.WccData:
        if self.call.objects.get(fh.data) not in self.call.changing:
            return T.WCC_EMPTY
        return unchanged(self._attr(fh))


class MetaSink(Protocol):
    """Where VRPC-bound replies' attributes go (`vrpc.publisher.MetaPublisher`)."""

    def epoch0(self) -> int | None: ...

    def published(
        self,
        vm: int,
        oid: ObjectId,
        raw: bytes,
        mac: bytes,
        epoch0: int | None,
        owner: Callable[[], ObjectId],
    ) -> None: ...


class NfsService:
    """Shared state of the NFS and MOUNT programs: the store executor and handle codec."""

    def __init__(self, executor: StoreExecutor, *, durable_replies: bool = True) -> None:
        self.executor = executor
        self.durable_replies = durable_replies
        self.meta: MetaSink | None = None
        """VRPC's attribute tables (`vrpc.publisher.MetaPublisher`), once a server has them:
        what VRPC-bound GETATTR and LOOKUP replies carry is published there."""
        """False (`prism serve --async`): only COMMIT waits for durability."""
        self.store: FileStore = executor.store
        self.handles = HandleCodec(self.store.secret)
        self._encoded_entries: dict[tuple[int, int, int, bytes, bytes], T.EncodedEntry] = {}
        """READDIRPLUS entries by (fsid, vol, ino, name, inode record): an entry's bytes are a
        function of exactly these, so a hit is always current. Listing a directory again
        (ls, find, make) then re-encodes only what changed."""
        self.mounts: set[MountRecord] = set()
        self.vm_stats: dict[int, VmStats] = {}
        """Per-VM figures by VM id (`account`), for the metrics endpoint."""
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

    def _oid(self, s: FileStore, call: Call, fh: T.NfsFh3) -> ObjectId:
        """The object `fh` names, admitting the call to its VM; a handle that cannot be
        used raises a bare NfsError."""
        try:
            oid = self.handles.decode(fh.data)
        except BadHandle:
            raise NfsError(NfsStat3.NFS3ERR_BADHANDLE, bare=True) from None
        try:
            export = s.export_of(oid.ns)  # Stale if the VM is gone
        except StoreError as exc:
            raise NfsError(nfsstat_for(exc), bare=True, error=exc) from None
        if call.vm is not None:  # a VRPC channel (its peer's right to it: vrpc.server)
            if export.vm != call.vm:
                raise NfsError(NfsStat3.NFS3ERR_ACCES, bare=True)
        elif not clients_allow(export.clients, call.host):
            raise NfsError(NfsStat3.NFS3ERR_ACCES, bare=True)
        elif not port_allowed(export, call.port):
            raise NfsError(NfsStat3.NFS3ERR_PERM, bare=True)  # knfsd's insecure port answer
        call.read_only = export.read_only
        call.cred = effective_cred(export, call.sent)
        call.objects[fh.data] = oid
        call.account = self.account(export.vm)
        return oid

    def account(self, vm: int) -> VmStats:
        """The figures of VM `vm` (by id), made on its first call."""
        stats = self.vm_stats.get(vm)
        if stats is None:
            stats = self.vm_stats[vm] = VmStats()
        return stats

    def _changing(self, s: FileStore, call: Call, fh: T.NfsFh3) -> ObjectId:
        """`_oid` for an object the call changes (its failure body carries wcc data). Every
        modifying procedure (and COMMIT, as knfsd) passes its objects through here, so this
        is where a read-only export answers NFS3ERR_ROFS, before the store is asked."""
        oid = self._oid(s, call, fh)
        call.changing.add(oid)
        if call.read_only:
            raise ReadOnly("the VM is exported read-only (`prism vm set VM --read-write`)")
        return oid

    def object_of(self, s: FileStore, host: str, fh: bytes, *, changing: bool = False) -> ObjectId:
        """What handle `fh` names, if `host` may use it: the check every NFS call makes,
        for the programs that take NFS handles too (NLM; `changing`: to take an exclusive
        lock, which a read-only export refuses as knfsd's). Raises BadHandle, the store's
        Stale if the VM is gone, ReadOnly, or PermissionDenied if `host` is not bound to it."""
        admit = self._changing if changing else self._oid
        try:
            return admit(s, Call(host, Cred(NOBODY, NOBODY, ())), T.NfsFh3(fh))
        except NfsError as exc:
            if exc.error is not None:
                raise exc.error from None
            if exc.status == NfsStat3.NFS3ERR_BADHANDLE:
                raise BadHandle("not a handle of this server") from None
            raise PermissionDenied(f"{host} is not bound to this handle's VM") from None

    def verifier(self) -> bytes:
        """The write verifier: changes when the server restarts or loses a batch."""
        return self.store.boot_id.to_bytes(8, "big")

    def fh(self, oid: ObjectId) -> T.NfsFh3:
        return T.NfsFh3(self.handles.encode(oid))

    # -- the RPC glue: one procedure per table row ----------------------------------------

    def _procedure(self, proc: Nfs3Proc, row: T.ProcRow) -> Procedure:
        body: Callable[[FileStore, Call, Any], Any] = getattr(self, row.handler)
        decode, encode = row.args, row.res
        durability = row.durability
        number = int(proc)

        def answer(s: FileStore, call: Call, args: Any) -> Any:
            """The procedure's result; a raised failure becomes its failure result."""
            try:
                return body(s, call, args)
            except NfsError as exc:
                if exc.bare:
                    return row.res(exc.status)
                status, attrs = exc.status, {}
            except StoreError as exc:
                status, attrs = nfsstat_for(exc), exc.attrs
            finally:
                if call.account is not None:
                    call.account.calls[number] += 1
            return row.failed(status, args, Gathered(s, call, attrs))

        def durable(args: Any) -> bool:
            if not self.durable_replies:
                return durability is Durability.COMMIT
            if durability is Durability.STABLE:
                return bool(args.stable != StableHow.UNSTABLE)
            return durability is not Durability.NONE

        async def handler(ctx: CallContext, data: bytes) -> bytes:
            args = T.decode_as(decode, data)
            call = call_of(ctx)
            try:
                result = await self.executor.call(
                    lambda s: answer(s, call, args), writes=row.writes, durable=durable(args)
                )
            except StoreError as exc:  # the change could not be made durable: not done
                result = row.res(nfsstat_for(exc))
            return T.encode_as(encode, result)

        def immediate(ctx: CallContext, data: bytes) -> bytes:
            """A call that changes nothing never waits: answer it without a coroutine."""
            args = T.decode_as(decode, data)
            call = call_of(ctx)
            return T.encode_as(encode, self.executor.call_now(lambda s: answer(s, call, args)))

        waits = durability is not Durability.NONE
        return Procedure(
            int(proc), proc.name, handler, row.idempotent, None if waits else immediate
        )

    def program(self) -> Program:
        rows = [self._procedure(proc, row) for proc, row in T.NFS3_PROCS.items()]
        return Program(NFS_PROGRAM, "nfs", {NFS_V3: procedure_table(rows)})

    # -- procedures, in RFC 1813 order ----------------------------------------------------

    def null(self, s: FileStore, call: Call, a: T.Void) -> T.Void:
        return T.VOID

    def getattr(self, s: FileStore, call: Call, a: T.GetattrArgs) -> T.GetattrRes:
        meta = self.meta if call.vm is not None else None
        epoch0 = meta.epoch0() if meta is not None else None  # before the store reads
        oid = self._oid(s, call, a.object)
        attr = fattr3(s.getattr(oid))
        if meta is not None:
            self._publish(meta, s, call, oid, attr, a.object.data, epoch0)
        return T.GetattrRes(OK, attr)

    def setattr(self, s: FileStore, call: Call, a: T.SetattrArgs) -> T.SetattrRes:
        oid = self._changing(s, call, a.object)
        guard = a.guard.to_ns() if a.guard is not None else None
        wcc = s.setattr_wcc(oid, setattr_of(a.new_attributes), call.cred, guard_ctime_ns=guard)
        return T.SetattrRes(OK, wcc_data(wcc))

    def lookup(self, s: FileStore, call: Call, a: T.LookupArgs) -> T.LookupRes:
        meta = self.meta if call.vm is not None else None
        epoch0 = meta.epoch0() if meta is not None else None  # before the store reads
        dir_oid = self._oid(s, call, a.what.dir)
        found = s.lookup_in(dir_oid, a.what.name, call.cred)
        fh, attr = self.fh(found.attr.oid), fattr3(found.attr)
        if meta is not None:
            self._publish(meta, s, call, found.attr.oid, attr, fh.data, epoch0)
        return T.LookupRes(OK, fh, attr, fattr3(found.dir))

    @staticmethod
    def _publish(
        meta: MetaSink,
        s: FileStore,
        call: Call,
        oid: ObjectId,
        attr: T.Fattr3,
        fh: bytes,
        epoch0: int | None,
    ) -> None:
        """Publish a reply's attributes into the calling VM's table (VRPC calls only)."""
        assert call.vm is not None
        raw = cast(T.PackedFattr3, attr).raw
        meta.published(call.vm, oid, raw, fh[-MAC_SIZE:], epoch0, lambda: s.identity(oid))

    def access(self, s: FileStore, call: Call, a: T.AccessArgs) -> T.AccessRes:
        oid = self._oid(s, call, a.object)
        access = s.access_attr(oid, call.cred, a.access)
        granted = access.granted & ~(ACCESS_WRITES if call.read_only else 0)
        return T.AccessRes(OK, fattr3(access.attr), granted)

    def readlink(self, s: FileStore, call: Call, a: T.ReadlinkArgs) -> T.ReadlinkRes:
        oid = self._oid(s, call, a.symlink)
        link = s.readlink_attr(oid)
        return T.ReadlinkRes(OK, fattr3(link.attr), link.target)

    def read(self, s: FileStore, call: Call, a: T.ReadArgs) -> T.ReadRes:
        oid = self._oid(s, call, a.file)
        got = s.read_attr(oid, a.offset, min(a.count, call.max_read), call.cred)
        if call.account is not None:
            call.account.read_bytes += len(got.data)
        return T.ReadRes(OK, fattr3(got.attr), got.eof, got.data)

    def write(self, s: FileStore, call: Call, a: T.WriteArgs) -> T.WriteRes:
        oid = self._changing(s, call, a.file)
        data = a.data if len(a.data) <= MAX_WRITE else a.data[:MAX_WRITE]  # a short write
        wcc = s.write_wcc(oid, a.offset, data, call.cred)
        if call.account is not None:
            call.account.written_bytes += len(data)
        # With --async nothing is durable before COMMIT, and the reply says so.
        unstable = a.stable == StableHow.UNSTABLE or not self.durable_replies
        committed = StableHow.UNSTABLE if unstable else StableHow.FILE_SYNC
        return T.WriteRes(OK, wcc_data(wcc), len(data), committed, self.verifier())

    def _made(self, res: type[T.CreateRes], made: Made) -> T.CreateRes:
        """CREATE, MKDIR, SYMLINK and MKNOD's OK result for the object made."""
        return res(OK, self.fh(made.attr.oid), fattr3(made.attr), wcc_data(made.dir))

    def create(self, s: FileStore, call: Call, a: T.CreateArgs) -> T.CreateRes:
        dir_oid = self._changing(s, call, a.where.dir)
        sattr = setattr_of(a.obj_attributes or T.SATTR_EMPTY)
        made = s.create_wcc(
            dir_oid,
            a.where.name,
            sattr.mode if sattr.mode is not None else 0o644,
            call.cred,
            exclusive=a.verf if a.mode == CreateMode.EXCLUSIVE else None,
            guarded=a.mode == CreateMode.GUARDED,
            sattr=sattr if a.mode != CreateMode.EXCLUSIVE else None,
        )
        return self._made(T.CreateRes, made)

    def mkdir(self, s: FileStore, call: Call, a: T.MkdirArgs) -> T.CreateRes:
        dir_oid = self._changing(s, call, a.where.dir)
        sattr = setattr_of(a.attributes)
        mode = sattr.mode if sattr.mode is not None else 0o755
        made = s.mkdir_wcc(dir_oid, a.where.name, mode, call.cred, sattr=sattr)
        return self._made(T.MkdirRes, made)

    def symlink(self, s: FileStore, call: Call, a: T.SymlinkArgs) -> T.CreateRes:
        dir_oid = self._changing(s, call, a.where.dir)
        sattr = setattr_of(a.symlink_attributes)
        made = s.symlink_wcc(dir_oid, a.where.name, a.symlink_data, call.cred, sattr=sattr)
        return self._made(T.SymlinkRes, made)

    def mknod(self, s: FileStore, call: Call, a: T.MknodArgs) -> T.CreateRes:
        dir_oid = self._changing(s, call, a.where.dir)
        if a.type not in MKNOD_TYPES:
            raise NfsError(NfsStat3.NFS3ERR_BADTYPE)
        spec = a.spec or T.SpecData3()
        sattr = setattr_of(a.attributes or T.SATTR_EMPTY)
        mode = sattr.mode if sattr.mode is not None else 0o644
        rdev = (spec.specdata1, spec.specdata2)
        kind = file_type(a.type)
        made = s.mknod_wcc(dir_oid, a.where.name, kind, mode, call.cred, rdev=rdev, sattr=sattr)
        return self._made(T.MknodRes, made)

    def remove(self, s: FileStore, call: Call, a: T.RemoveArgs) -> T.RemoveRes:
        dir_oid = self._changing(s, call, a.object.dir)
        return T.RemoveRes(OK, wcc_data(s.remove_wcc(dir_oid, a.object.name, call.cred)))

    def rmdir(self, s: FileStore, call: Call, a: T.RmdirArgs) -> T.RemoveRes:
        dir_oid = self._changing(s, call, a.object.dir)
        return T.RmdirRes(OK, wcc_data(s.rmdir_wcc(dir_oid, a.object.name, call.cred)))

    def rename(self, s: FileStore, call: Call, a: T.RenameArgs) -> T.RenameRes:
        src = self._changing(s, call, a.from_.dir)
        dst = self._changing(s, call, a.to.dir)
        moved = s.rename_wcc(src, a.from_.name, dst, a.to.name, call.cred)
        return T.RenameRes(OK, wcc_data(moved.src), wcc_data(moved.dst))

    def link(self, s: FileStore, call: Call, a: T.LinkArgs) -> T.LinkRes:
        oid = self._oid(s, call, a.file)
        dir_oid = self._changing(s, call, a.link.dir)
        made = s.link_wcc(oid, dir_oid, a.link.name, call.cred)
        return T.LinkRes(OK, fattr3(made.attr), wcc_data(made.dir))

    def _listing(
        self, s: FileStore, call: Call, fh: T.NfsFh3, cookie: int, budget: int, plus: bool
    ) -> tuple[Attr, list[Any], bool]:
        """The directory's attributes and its entries after `cookie` that fit in `budget`
        reply bytes ('.' and '..' first)."""
        dir_oid = self._oid(s, call, fh)
        guess = ENTRY_PLUS_GUESS if plus else ENTRY_GUESS
        try:  # the first page, with the directory's attributes and its parent's
            listing = s.readdir_raw(
                dir_oid,
                min(cookie, LAST_COOKIE),
                call.cred,
                limit=max(8, min(1024, budget // guess + 8)),
                attrs=plus,
                parent=cookie < DOTDOT_COOKIE,
            )
        except NotADirectory:
            raise NfsError(NfsStat3.NFS3ERR_NOTDIR, bare=True) from None
        if cookie > LAST_COOKIE:  # no entry was ever given this cookie
            raise NfsError(NfsStat3.NFS3ERR_BAD_COOKIE, bare=True)
        dir_attr = listing.dir
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
                    attr.fileid, name, c, packed_fattr3(attr), self.handles.encode(attr.oid)
                )
            return T.EncodedEntry.entry3(attr.fileid, name, c)

        if cookie < DOT_COOKIE and not fits(make(b".", dir_attr, DOT_COOKIE)):
            raise NfsError(NfsStat3.NFS3ERR_TOOSMALL, bare=True)
        if listing.parent is not None and not fits(make(b"..", listing.parent, DOTDOT_COOKIE)):
            return dir_attr, entries, False
        after = cookie
        ns = dir_oid.ns
        encode_handle = self.handles.encode_ids
        encoded = self._encoded_entries
        while True:
            for c, name, vol, ino, record in listing.entries:
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
                            record_attrs(record),
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
                        raise NfsError(NfsStat3.NFS3ERR_TOOSMALL, bare=True)
                    return dir_attr, entries, False
                used += size
                entries.append(item)
                after = c
            if listing.eof:
                return dir_attr, entries, True
            # What is left of the page holds about this many entries: fetch just those.
            limit = max(8, min(1024, (budget - used) // guess + 8))
            listing = s.readdir_raw(dir_oid, after, call.cred, limit=limit, attrs=plus)

    def readdir(self, s: FileStore, call: Call, a: T.ReaddirArgs) -> T.ReaddirRes:
        budget = min(a.count, call.max_readdir) - T.READDIR_RESOK_MAX_FIXED
        dir_attr, entries, eof = self._listing(s, call, a.dir, a.cookie, budget, False)
        return T.ReaddirRes(OK, fattr3(dir_attr), COOKIE_VERIFIER, tuple(entries), eof)

    def readdirplus(self, s: FileStore, call: Call, a: T.ReaddirplusArgs) -> T.ReaddirplusRes:
        budget = min(a.maxcount, call.max_readdir) - T.READDIR_RESOK_MAX_FIXED
        dir_attr, entries, eof = self._listing(s, call, a.dir, a.cookie, budget, True)
        return T.ReaddirplusRes(OK, fattr3(dir_attr), COOKIE_VERIFIER, tuple(entries), eof)

    def fsstat(self, s: FileStore, call: Call, a: T.FsstatArgs) -> T.FsstatRes:
        oid = self._oid(s, call, a.fsroot)
        space = s.fsstat_attr(oid)
        st = space.stat
        return T.FsstatRes(
            OK,
            None if space.attr is None else fattr3(space.attr),
            st.total_bytes,
            st.free_bytes,
            st.avail_bytes,
            st.total_files,
            st.free_files,
            st.free_files,
            0,
        )

    def fsinfo(self, s: FileStore, call: Call, a: T.FsinfoArgs) -> T.FsinfoRes:
        oid = self._oid(s, call, a.fsroot)
        return T.FsinfoRes(
            OK,
            post_attr(s, oid),
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

    def pathconf(self, s: FileStore, call: Call, a: T.PathconfArgs) -> T.PathconfRes:
        oid = self._oid(s, call, a.object)
        return T.PathconfRes(
            OK,
            post_attr(s, oid),
            linkmax=NLINK_MAX,
            name_max=NAME_MAX,
            no_trunc=True,
            chown_restricted=True,
            case_insensitive=False,
            case_preserving=True,
        )

    def commit(self, s: FileStore, call: Call, a: T.CommitArgs) -> T.CommitRes:
        oid = self._changing(s, call, a.file)
        # Durability comes from the executor: this call is `durable`, so its reply waits for
        # the commit of the open batch, which holds every earlier UNSTABLE write.
        try:
            attr: Attr | None = s.getattr(oid)
        except StoreError:
            attr = None
        return T.CommitRes(OK, unchanged(attr), self.verifier())

    # -- MOUNT ---------------------------------------------------------------------------

    def mount_program(self) -> Program:
        def procedure(proc: Mount3Proc, row: T.ProcRow) -> Procedure:
            fn: Callable[[CallContext, Any], Any] = getattr(self, row.handler)

            async def handler(ctx: CallContext, data: bytes) -> bytes:
                return T.encode_as(row.res, await fn(ctx, T.decode_as(row.args, data)))

            return Procedure(int(proc), proc.name, handler, row.idempotent)

        rows = [procedure(proc, row) for proc, row in T.MOUNT3_PROCS.items()]
        return Program(
            MOUNT_PROGRAM, "mount", {1: procedure_table(rows), MOUNT_V3: procedure_table(rows)}
        )

    async def mount_null(self, ctx: CallContext, args: T.Void) -> T.Void:
        return T.VOID

    async def mnt(self, ctx: CallContext, args: T.DirPath) -> T.MountRes:
        host, port = ctx.peer
        path = args.path

        def run(s: FileStore) -> T.MountRes:
            try:
                text = path.decode()
            except UnicodeDecodeError:
                return T.MountRes(MountStat3.MNT3ERR_NOENT)
            name, _, rest = text.strip("/").partition("/")
            if not EXPORT_NAME.fullmatch(name):
                # No VM has an empty or over-long name ("/", "", 600 bytes), and only a VM
                # name may reach LMDB as a key: anything else is NOENT, never SYSTEM_ERR.
                log.info("MNT %r from %s refused: not a VM name", text[:100], host)
                return T.MountRes(MountStat3.MNT3ERR_NOENT)
            try:
                found = s.mountable(name, "/" + rest)
                info = found.info
                if ctx.binding is not None:  # a VRPC channel, bound to one VM
                    if info.export.vm != ctx.binding:
                        raise PermissionDenied(f"{host} is a channel of another VM than {name}")
                elif not client_allowed(info, host):
                    raise PermissionDenied(f"{host} is not bound to {name}")
                elif not port_allowed(info.export, port):
                    raise PermissionDenied(
                        f"{host} called from unprivileged port {port} and {name} is secure "
                        f"(mount as root, or allow it with `prism vm set {name} --insecure`)"
                    )
                if found.missing is not None:  # (told only to who may mount the VM)
                    raise found.missing
                attr = found.attr
                assert attr is not None
                if attr.type != FileType.DIR:
                    return T.MountRes(MountStat3.MNT3ERR_NOTDIR)
            except (StoreError, NotFound, Stale) as exc:
                log.info("MNT %s from %s refused: %s", text, host, exc)
                return T.MountRes(mountstat_for(exc))
            # DUMP is advisory: record the path in one spelling per directory, and a bounded
            # number of them, so a client cannot grow the table with "/vm//x/./" variants.
            if len(self.mounts) < MAX_MOUNT_ENTRIES:
                self.mounts.add(MountRecord.of(host, info.id, path))
            return T.MountRes(
                MountStat3.MNT3_OK,
                self.fh(attr.oid),
                (int(AuthFlavor.AUTH_SYS), int(AuthFlavor.AUTH_NONE)),
            )

        return await self.executor.call(run)

    def _mount_names(self, s: FileStore, records: set[MountRecord]) -> dict[int, str]:
        """The current names of the namespaces `records` name; those of removed ones are
        forgotten (ids are never reused)."""
        names = {}
        for ns in {m.ns for m in records}:
            try:
                names[ns] = s.namespace_by_id(ns).name
            except StoreError:
                self.mounts = {m for m in self.mounts if m.ns != ns}
        return names

    async def dump(self, ctx: CallContext, args: Any) -> T.MountList:
        def run(s: FileStore) -> T.MountList:
            names = self._mount_names(s, self.mounts)
            shown = {(m.host.encode(), m.path(names)) for m in self.mounts}
            return T.MountList(tuple(T.MountBody(h, p) for h, p in sorted(shown)))

        return await self.executor.call(run)

    async def umnt(self, ctx: CallContext, args: T.DirPath) -> T.Void:
        host, path = ctx.peer[0], canonical_mount_path(args.path)

        def run(s: FileStore) -> None:
            mine = {m for m in self.mounts if m.host == host}
            names = self._mount_names(s, mine)
            self.mounts -= {
                m for m in mine if m.asked == path or (m.ns in names and m.path(names) == path)
            }

        await self.executor.call(run)
        return T.Void()

    async def umntall(self, ctx: CallContext, args: Any) -> T.Void:
        self.mounts = {m for m in self.mounts if m.host != ctx.peer[0]}
        return T.Void()

    async def export(self, ctx: CallContext, args: Any) -> T.Exports:
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
                if (
                    info.export.vm == ctx.binding
                    if ctx.binding is not None
                    else client_allowed(info, host)
                )
            )
        )
