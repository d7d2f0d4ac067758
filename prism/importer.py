"""`prism import`: copy a host directory tree into a VM, deduplicating as it goes.

Files, directories, symlinks, hard links (by host inode), device nodes, FIFOs and sockets are
recreated with their modes, owners and times; the source directory's own mode, owner and
times are given to the destination (as `cp -a SRC/. DEST` does). The destination is created
(like `mkdir -p`) when missing. Nothing that exists is overwritten: a name clash stops the
import.

All or nothing. The tree is built in a detached directory of the VM that no path reaches
(`Store.begin_staging`; it counts against the quota as it grows), group-committed in batches
of COMMIT_EVERY_BYTES of content, COMMIT_EVERY_OPS operations or COMMIT_EVERY_SECONDS (a
handful of fsyncs rather than one per file, and the store's write lock, which keeps a running
server's writes waiting, is held only in short steps), then
published at the destination in one small transaction (`Store.publish_staging`). Until then
the VM's tree is untouched. An import that fails, or is interrupted (Ctrl-C, SIGTERM),
discards what it staged; one that is killed outright leaves it as debris that the next
import or `prism gc` removes (its lock file is free), so a rerun simply works.

Only what was walked is copied. Every file is opened relative to its directory's file
descriptor with O_NOFOLLOW|O_NONBLOCK, and its fstat must name the object (device, inode,
type) that the walk's lstat saw: a file swapped for a symlink (to /etc/shadow, say) or for
a FIFO, socket or device while the import runs is skipped and reported, never followed and
never blocked on. On a terminal, progress (files, bytes, rate) is redrawn on one line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prism.errors import Exists, NotADirectory, NotFound, ReadOnly
from prism.store import Store
from prism.store.types import CHUNK_SIZE, FileType, ObjectId, SetAttr

COMMIT_EVERY_BYTES = 64 * 1024 * 1024
COMMIT_EVERY_OPS = 2000
COMMIT_EVERY_SECONDS = 0.5
READ_SIZE = 16 * CHUNK_SIZE
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_GONE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EINVAL, errno.ENXIO)
"""open/readlink errors meaning "the entry is no longer what the walk saw": skip it."""


@dataclass
class ImportReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    """Entries that changed between the walk's lstat and their opening (not copied)."""


class _Changed(Exception):
    """A source entry is no longer the object the walk saw."""


def _same(st: os.stat_result, fst: os.stat_result) -> bool:
    return (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode)) == (
        fst.st_dev,
        fst.st_ino,
        stat.S_IFMT(fst.st_mode),
    )


def _changed(exc: OSError) -> _Changed:
    if exc.errno == errno.ELOOP:
        return _Changed("became a symlink during the import")
    return _Changed(f"changed during the import: {os.strerror(exc.errno or 0)}")


def _open_verified(name: str, dir_fd: int, flags: int, st: os.stat_result) -> int:
    """Open `name` in `dir_fd` without following links; it must be the object `st` saw."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _GONE:
            raise _changed(exc) from None
        raise
    try:
        if not _same(st, os.fstat(fd)):
            raise _Changed("replaced by another object during the import")
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Importer:
    def __init__(self, store: Store, show_progress: bool) -> None:
        self.store = store
        self.report = ImportReport()
        self.links: dict[tuple[int, int], ObjectId] = {}
        self.pending_bytes = 0
        self.pending_ops = 0
        self.show = show_progress
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.batch_began = time.monotonic()

    def _tick(self, nbytes: int = 0) -> None:
        self.pending_bytes += nbytes
        self.pending_ops += 1
        if (
            self.pending_bytes >= COMMIT_EVERY_BYTES
            or self.pending_ops >= COMMIT_EVERY_OPS
            or time.monotonic() - self.batch_began >= COMMIT_EVERY_SECONDS
        ):
            self.store.commit()
            self.store.begin_batch()
            self.batch_began = time.monotonic()
            self.pending_bytes = self.pending_ops = 0
        if self.show and time.perf_counter() - self.last_draw > 0.2:
            self.last_draw = time.perf_counter()
            r = self.report
            elapsed = max(self.last_draw - self.start, 1e-9)
            sys.stderr.write(
                f"\r  {r.files} files, {r.dirs} dirs, {r.bytes / 1e6:.1f} MB "
                f"({r.files / elapsed:.0f} files/s, {r.bytes / elapsed / 1e6:.1f} MB/s)   "
            )
            sys.stderr.flush()

    def _owner_times(self, oid: ObjectId, st: os.stat_result, *, times: bool = True) -> None:
        self.store.setattr(
            oid,
            SetAttr(
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                atime_ns=st.st_atime_ns if times else None,
                mtime_ns=st.st_mtime_ns if times else None,
            ),
        )

    def copy_dir(self, src_fd: int, dest: ObjectId, label: str) -> None:
        """Copy the contents of the host directory open as `src_fd` into `dest` (named
        `label` in messages). Depth first: one open directory per level."""
        dirs_to_stamp: list[tuple[ObjectId, os.stat_result]] = []
        stack = [(src_fd, iter(sorted(os.listdir(src_fd))), dest, label)]
        try:
            while stack:
                dir_fd, names, dir_oid, where = stack[-1]
                name = next(names, None)
                if name is None:
                    if dir_fd != src_fd:
                        os.close(dir_fd)
                    stack.pop()
                    continue
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        sub_fd = _open_verified(name, dir_fd, _OPEN_DIR, st)
                        try:
                            listing = iter(sorted(os.listdir(sub_fd)))
                            attr = self.store.mkdir(
                                dir_oid, os.fsencode(name), stat.S_IMODE(st.st_mode)
                            )
                        except BaseException:
                            os.close(sub_fd)
                            raise
                        self.report.dirs += 1
                        dirs_to_stamp.append((attr.oid, st))
                        stack.append((sub_fd, listing, attr.oid, f"{where}{name}/"))
                        self._tick()
                    else:
                        self._copy_entry(dir_fd, name, st, dir_oid)
                except FileNotFoundError:
                    self.report.skipped.append(f"{where}{name} (removed during the import)")
                except _Changed as exc:
                    self.report.skipped.append(f"{where}{name} ({exc})")
        finally:
            for dir_fd, *_ in stack:
                if dir_fd != src_fd:
                    os.close(dir_fd)
        for oid, st in reversed(dirs_to_stamp):
            self._owner_times(oid, st)

    def _copy_entry(self, dir_fd: int, name: str, st: os.stat_result, dir_oid: ObjectId) -> None:
        mode = st.st_mode
        bname = os.fsencode(name)
        if st.st_nlink > 1:
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                self.store.link(first, dir_oid, bname)
                self.report.hardlinks += 1
                self._tick()
                return
        if stat.S_ISREG(mode):
            oid = self._copy_file(dir_fd, name, dir_oid, st)
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(bname, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in _GONE:
                    raise _changed(exc) from None
                raise
            oid = self.store.symlink(dir_oid, bname, target).oid
            self.store.setattr(
                oid,
                SetAttr(
                    uid=st.st_uid,
                    gid=st.st_gid,
                    atime_ns=st.st_atime_ns,
                    mtime_ns=st.st_mtime_ns,
                ),
            )
            self.report.symlinks += 1
            self._tick()
        else:
            kind = (
                FileType.FIFO
                if stat.S_ISFIFO(mode)
                else FileType.SOCK
                if stat.S_ISSOCK(mode)
                else FileType.CHR
                if stat.S_ISCHR(mode)
                else FileType.BLK
            )
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            oid = self.store.mknod(dir_oid, bname, kind, stat.S_IMODE(mode), rdev=rdev).oid
            self._owner_times(oid, st)
            self.report.specials += 1
            self._tick()
        if st.st_nlink > 1:
            self.links[(st.st_dev, st.st_ino)] = oid

    def _copy_file(self, dir_fd: int, name: str, dir_oid: ObjectId, st: os.stat_result) -> ObjectId:
        fd = _open_verified(name, dir_fd, _OPEN_FILE, st)
        try:
            attr = self.store.create(
                dir_oid, os.fsencode(name), stat.S_IMODE(st.st_mode), guarded=True
            )
            offset = 0
            while True:
                data = os.read(fd, READ_SIZE)
                if not data:
                    break
                self.store.write(attr.oid, offset, data)
                offset += len(data)
                self.report.bytes += len(data)
                self._tick(len(data))
            self._owner_times(attr.oid, st)
        finally:
            os.close(fd)
        self.report.files += 1
        self._tick()
        return attr.oid


def _refuse_clashes(store: Store, vm: str, to: str, names: list[str]) -> None:
    """Fail fast, before copying anything, when the import could not be published: `to`
    is not a directory, or an entry to import exists there (checked again on publishing)."""
    info = store.namespace(vm)
    try:
        attr = store.resolve(info.id, to)
    except NotFound:
        return
    except NotADirectory:
        raise NotADirectory(f"{vm}:{to} is not a directory; pick another --to") from None
    if attr.type != FileType.DIR:
        raise NotADirectory(f"{vm}:{to} is not a directory; pick another --to")
    there: set[bytes] = set()
    cookie, eof = 0, False
    while not eof:
        entries, eof = store.readdir(attr.oid, cookie, limit=1000)
        there.update(e.name for e in entries)
        if not entries:
            break
        cookie = entries[-1].cookie
    for name in names:
        if os.fsencode(name) in there:
            raise Exists(
                f"{vm}:{to.rstrip('/')}/{name} already exists; import into an empty or new "
                "directory with --to /path (nothing was imported)"
            )


def import_tree(
    store: Store, vm: str, src: Path, to: str = "/", *, progress: bool = False
) -> ImportReport:
    """Copy host directory `src` into VM `vm` at absolute path `to`; see the module doc."""
    info = store.namespace(vm)
    if info.readonly:
        raise ReadOnly(f"{vm} is a read-only snapshot; import into a VM")
    store.reap_stagings()
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _refuse_clashes(store, vm, to, os.listdir(src_fd))
        src_stat = os.fstat(src_fd)
        importer = _Importer(store, progress)
        label = f"{vm}:{to.rstrip('/')}/"
        staged, token, lock_fd = store.begin_staging(vm)
        try:
            store.begin_batch()
            importer.copy_dir(src_fd, staged, label)
            importer._owner_times(staged, src_stat)
            store.commit()
            store.publish_staging(token, to)
        except BaseException:
            store.abort()
            store.discard_staging(token)
            raise
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
            if progress:
                sys.stderr.write("\n")
    finally:
        os.close(src_fd)
    importer.report.seconds = time.perf_counter() - importer.start
    return importer.report
