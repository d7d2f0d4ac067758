"""`prism import`: copy a host directory tree into a VM, deduplicating as it goes.

Files, directories, symlinks, hard links (by host inode), device nodes, FIFOs and sockets are
recreated with their modes, owners and times; the source directory's own mode, owner and
times are given to the destination (as `cp -a SRC/. DEST` does). The destination is created
(like `mkdir -p`) when missing. Nothing that exists is overwritten: a name clash stops the
import.

Work is group-committed: operations run in one store batch that commits every
COMMIT_EVERY_BYTES of content, COMMIT_EVERY_OPS operations or COMMIT_EVERY_SECONDS, so the
import costs a handful of fsyncs rather than one per file, and holds the store's write lock
(keeping a running server's writes waiting) only in short steps. A file is opened without
blocking and must still be a regular file, so a FIFO swapped in cannot stall the import.
All or nothing: if the import fails or is interrupted after some batches were committed,
what it created (the destination, when the import made it, else each top-level entry it
added) is removed again before the error is raised, so the VM is left as it was. On a
terminal, progress (files, bytes, rate) is redrawn on one line.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prism.errors import Exists, NotADirectory, NotFound, ReadOnly, StoreError
from prism.store import Store
from prism.store.types import CHUNK_SIZE, FileType, ObjectId, SetAttr

COMMIT_EVERY_BYTES = 64 * 1024 * 1024
COMMIT_EVERY_OPS = 2000
COMMIT_EVERY_SECONDS = 0.5
READ_SIZE = 16 * CHUNK_SIZE


@dataclass
class ImportReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    bytes: int = 0
    seconds: float = 0.0


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
        self.commits = 0
        self.batch_began = time.monotonic()
        self.created: list[tuple[ObjectId, bytes]] = []
        """What to remove to undo the import: (directory, name) of each top-level addition."""
        self.track: ObjectId | None = None
        """The directory whose new entries go into `created` (None: the import made it)."""

    def _made(self, dir_oid: ObjectId, name: bytes) -> None:
        """Record that `name` was just made in `dir_oid` (for undo)."""
        if dir_oid == self.track:
            self.created.append((dir_oid, name))

    def _tick(self, nbytes: int = 0) -> None:
        self.pending_bytes += nbytes
        self.pending_ops += 1
        if (
            self.pending_bytes >= COMMIT_EVERY_BYTES
            or self.pending_ops >= COMMIT_EVERY_OPS
            or time.monotonic() - self.batch_began >= COMMIT_EVERY_SECONDS
        ):
            self.store.commit()
            self.commits += 1
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

    def make_dest(self, label: str, root: ObjectId, path: str) -> ObjectId:
        """The directory at `path` (absolute, normalised), made like `mkdir -p` if missing."""
        oid = root
        here = ""
        for part in [p for p in path.split("/") if p]:
            here += "/" + part
            name = os.fsencode(part)
            try:
                attr = self.store.lookup(oid, name)
            except NotFound:
                attr = self.store.mkdir(oid, name, 0o755)
                if not self.created:
                    self.created.append((oid, name))
            if attr.type != FileType.DIR:
                raise NotADirectory(f"{label}{here} is not a directory; pick another --to")
            oid = attr.oid
        return oid

    def copy_dir(self, src: Path, dest: ObjectId, label: str) -> None:
        """Copy the contents of host directory `src` into `dest` (named `label` in errors)."""
        dirs_to_stamp: list[tuple[ObjectId, os.stat_result]] = []
        if not self.created:  # else undo removes the destination, which the import made
            self.track = dest
        stack = [(src, dest, label)]
        while stack:
            host_dir, dir_oid, where = stack.pop()
            with os.scandir(host_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                name = os.fsencode(entry.name)
                st = entry.stat(follow_symlinks=False)
                try:
                    self._copy_entry(entry, name, st, dir_oid, where, dirs_to_stamp, stack)
                except Exists:
                    raise Exists(
                        f"{where}{entry.name} already exists; import into an empty or new "
                        "directory with --to /path (nothing was imported)"
                    ) from None
        for oid, st in reversed(dirs_to_stamp):
            self._owner_times(oid, st)

    def _copy_entry(
        self,
        entry: os.DirEntry[str],
        name: bytes,
        st: os.stat_result,
        dir_oid: ObjectId,
        where: str,
        dirs_to_stamp: list[tuple[ObjectId, os.stat_result]],
        stack: list[tuple[Path, ObjectId, str]],
    ) -> None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            attr = self.store.mkdir(dir_oid, name, stat.S_IMODE(mode))
            self._made(dir_oid, name)
            self.report.dirs += 1
            dirs_to_stamp.append((attr.oid, st))
            stack.append((Path(entry.path), attr.oid, f"{where}{entry.name}/"))
            self._tick()
            return
        if st.st_nlink > 1 and not stat.S_ISDIR(mode):
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                self.store.link(first, dir_oid, name)
                self._made(dir_oid, name)
                self.report.hardlinks += 1
                self._tick()
                return
        if stat.S_ISREG(mode):
            oid = self._copy_file(Path(entry.path), dir_oid, name, st)
        elif stat.S_ISLNK(mode):
            target = os.readlink(os.fsencode(entry.path))
            oid = self.store.symlink(dir_oid, name, target).oid
            self._made(dir_oid, name)
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
            oid = self.store.mknod(dir_oid, name, kind, stat.S_IMODE(mode), rdev=rdev).oid
            self._made(dir_oid, name)
            self._owner_times(oid, st)
            self.report.specials += 1
            self._tick()
        if st.st_nlink > 1:
            self.links[(st.st_dev, st.st_ino)] = oid

    def _copy_file(
        self, path: Path, dir_oid: ObjectId, name: bytes, st: os.stat_result
    ) -> ObjectId:
        attr = self.store.create(dir_oid, name, stat.S_IMODE(st.st_mode), guarded=True)
        self._made(dir_oid, name)
        offset = 0
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise OSError(errno.EAGAIN, "changed during the import; retry", str(path))
        with open(fd, "rb", buffering=0) as f:
            while True:
                data = f.read(READ_SIZE)
                if not data:
                    break
                self.store.write(attr.oid, offset, data)
                offset += len(data)
                self.report.bytes += len(data)
                self._tick(len(data))
        self._owner_times(attr.oid, st)
        self.report.files += 1
        self._tick()
        return attr.oid

    def undo(self) -> None:
        """Remove what committed batches of a failed import added (in one new batch)."""
        self.store.begin_batch()
        try:
            for dir_oid, name in reversed(self.created):
                _remove_tree(self.store, dir_oid, name)
            self.store.commit()
        except BaseException:
            self.store.abort()
            raise


def _remove_tree(store: Store, dir_oid: ObjectId, name: bytes) -> None:
    """Remove `name` in `dir_oid` and everything below it (depth first, no recursion)."""
    stack = [(dir_oid, name, False)]
    while stack:
        parent, entry_name, emptied = stack.pop()
        try:
            attr = store.lookup(parent, entry_name)
        except NotFound:
            continue
        if attr.type != FileType.DIR:
            store.remove(parent, entry_name)
        elif emptied:
            store.rmdir(parent, entry_name)
        else:
            stack.append((parent, entry_name, True))
            cookie = 0
            while True:
                entries, eof = store.readdir(attr.oid, cookie, limit=1000)
                stack.extend((attr.oid, e.name, False) for e in entries)
                if eof or not entries:
                    break
                cookie = entries[-1].cookie


def import_tree(
    store: Store, vm: str, src: Path, to: str = "/", *, progress: bool = False
) -> ImportReport:
    """Copy host directory `src` into VM `vm` at absolute path `to`; see the module doc."""
    info = store.namespace(vm)
    if info.readonly:
        raise ReadOnly(f"{vm} is a read-only snapshot; import into a VM")
    src_stat = os.stat(src)
    importer = _Importer(store, progress)
    label = f"{vm}:{to.rstrip('/')}/"
    store.begin_batch()
    try:
        dest = importer.make_dest(f"{vm}:", info.root, to)
        importer.copy_dir(src, dest, label)
        importer._owner_times(dest, src_stat)
        store.commit()
    except BaseException as exc:
        store.abort()
        if importer.commits:
            try:
                importer.undo()
            except (StoreError, OSError) as undo_exc:
                raise StoreError(
                    f"import failed ({exc}) and what it had committed could not be removed "
                    f"({undo_exc}); remove {label} entries it added over NFS"
                ) from exc
        raise
    finally:
        if progress:
            sys.stderr.write("\n")
    importer.report.seconds = time.perf_counter() - importer.start
    return importer.report
