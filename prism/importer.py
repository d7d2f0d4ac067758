"""`prism import`: copy a host directory tree into a VM, deduplicating as it goes.

Files, directories, symlinks, hard links (by host inode), device nodes, FIFOs and sockets are
recreated with their modes, owners and times. Work is group-committed: operations run in one
store batch that commits every COMMIT_EVERY_BYTES of content or COMMIT_EVERY_OPS operations,
so the import costs a handful of fsyncs rather than one per file. On a terminal, progress
(files, bytes, rate) is redrawn on one line.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prism.errors import NotADirectory
from prism.store import Store
from prism.store.types import CHUNK_SIZE, FileType, ObjectId, SetAttr

COMMIT_EVERY_BYTES = 64 * 1024 * 1024
COMMIT_EVERY_OPS = 2000
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

    def _tick(self, nbytes: int = 0) -> None:
        self.pending_bytes += nbytes
        self.pending_ops += 1
        if self.pending_bytes >= COMMIT_EVERY_BYTES or self.pending_ops >= COMMIT_EVERY_OPS:
            self.store.commit()
            self.store.begin_batch()
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

    def copy_dir(self, src: Path, dest: ObjectId) -> None:
        dirs_to_stamp: list[tuple[ObjectId, os.stat_result]] = []
        stack = [(src, dest)]
        while stack:
            host_dir, dir_oid = stack.pop()
            with os.scandir(host_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                name = os.fsencode(entry.name)
                st = entry.stat(follow_symlinks=False)
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    attr = self.store.mkdir(dir_oid, name, stat.S_IMODE(mode))
                    self.report.dirs += 1
                    dirs_to_stamp.append((attr.oid, st))
                    stack.append((Path(entry.path), attr.oid))
                    self._tick()
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(mode):
                    first = self.links.get((st.st_dev, st.st_ino))
                    if first is not None:
                        self.store.link(first, dir_oid, name)
                        self.report.hardlinks += 1
                        self._tick()
                        continue
                if stat.S_ISREG(mode):
                    oid = self._copy_file(Path(entry.path), dir_oid, name, st)
                elif stat.S_ISLNK(mode):
                    target = os.readlink(os.fsencode(entry.path))
                    oid = self.store.symlink(dir_oid, name, target).oid
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
                    self._owner_times(oid, st)
                    self.report.specials += 1
                    self._tick()
                if st.st_nlink > 1:
                    self.links[(st.st_dev, st.st_ino)] = oid
        for oid, st in reversed(dirs_to_stamp):
            self._owner_times(oid, st)

    def _copy_file(
        self, path: Path, dir_oid: ObjectId, name: bytes, st: os.stat_result
    ) -> ObjectId:
        attr = self.store.create(dir_oid, name, stat.S_IMODE(st.st_mode), guarded=True)
        offset = 0
        with open(path, "rb", buffering=0) as f:
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


def import_tree(
    store: Store, vm: str, src: Path, to: str = "/", *, progress: bool = False
) -> ImportReport:
    info = store.namespace(vm)
    dest = store.resolve(info.id, to)
    if dest.type != FileType.DIR:
        raise NotADirectory(f"{vm}:{to} is not a directory")
    importer = _Importer(store, progress)
    store.begin_batch()
    try:
        importer.copy_dir(src, dest.oid)
        store.commit()
    except BaseException:
        store.abort()
        raise
    finally:
        if progress:
            sys.stderr.write("\n")
    importer.report.seconds = time.perf_counter() - importer.start
    return importer.report
