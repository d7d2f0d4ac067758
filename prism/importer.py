"""`prism import`: copy a host directory tree into a VM, deduplicating as it goes.

Files, directories, symlinks, hard links (by host inode), device nodes, FIFOs and sockets are
recreated with their modes, owners and times; the source directory's own mode, owner and
times are given to the destination (as `cp -a SRC/. DEST` does). The destination is created
(like `mkdir -p`) when missing. Nothing that exists is overwritten: a name clash stops the
import.

What is taken (`Selection`). `Exclude` patterns leave entries out, as tar's and rsync's
--exclude do: a pattern without '/' matches a name at any depth, one with '/' the path from
the source's top; an excluded directory is never opened. With `one_file_system`, a mount
point (an entry whose device differs from the source's, as cp -x and rsync -x tell them
apart, or one that /proc/self/mountinfo names, which a bind mount of the same filesystem
needs) is not entered: a directory is created empty with the mounted root's attributes (as
`cp -ax` and `rsync -ax` do), anything else is left out; both are listed in the report.

One walk (`_walk`), two visitors. Depth first in name order, one open directory per level;
the `_Counter` visitor only adds up what the `_Importer` visitor would copy (by lstat: no
file is read), so a dry run's report is the import's report, and the pre-scan gives the
progress display (`Progress`) its totals and, when the VM has a quota, refuses an import
that would not fit it before anything is staged (`QuotaShortfall`). Memory: O(depth +
largest directory listing + multiply-linked files (whose first copy each later link
names)), whatever the tree's size; a directory's times are set when the walk leaves it.

All or nothing. The tree is built in a detached directory of the VM that no path reaches
(`Store.begin_staging`; it counts against the quota as it grows), group-committed in batches
of COMMIT_EVERY_BYTES of content, COMMIT_EVERY_OPS operations or COMMIT_EVERY_SECONDS (a
handful of fsyncs rather than one per file, and the store's write lock, which keeps a running
server's writes waiting, is held only in short steps), then
published at the destination in one small transaction (`Store.publish_staging`). Until then
the VM's tree is untouched. An import that fails, or is interrupted (Ctrl-C, SIGTERM),
discards what it staged; one that is killed outright leaves it as debris that the next
import or `prism gc` removes (its lock file is free), so a rerun simply works. A dry run
writes nothing at all (it neither reaps nor stages).

Only what was walked is copied. Every file is opened relative to its directory's file
descriptor with O_NOFOLLOW|O_NONBLOCK, and its fstat must name the object (device, inode,
type) that the walk's lstat saw: a file swapped for a symlink (to /etc/shadow, say) or for
a FIFO, socket or device while the import runs is skipped and reported, never followed and
never blocked on.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import re
import stat
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from prism.errors import Exists, NotADirectory, NotFound, QuotaExceeded, ReadOnly
from prism.store import Store
from prism.store.types import CHUNK_SIZE, FileType, ObjectId, SetAttr

COMMIT_EVERY_BYTES = 64 * 1024 * 1024
COMMIT_EVERY_OPS = 2000
COMMIT_EVERY_SECONDS = 0.5
READ_SIZE = 16 * CHUNK_SIZE
PROGRESS_INTERVAL_SECONDS = 10.0
"""Default seconds between two progress lines when stderr is not a terminal."""
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
    """Wall time of the whole command, the pre-scan included."""
    scan_seconds: float = 0.0
    """Of which the pre-scan (0 when there was none)."""
    skipped: list[str] = field(default_factory=list)
    """Entries that changed between the walk's lstat and their opening (not copied)."""
    excluded: int = 0
    """Entries an --exclude pattern left out (a directory counts once: it is not entered)."""
    mount_points: list[str] = field(default_factory=list)
    """With one_file_system: the other filesystems' mount points, as /paths from the
    source's top (directories created empty; others not copied)."""
    dry_run: bool = False
    charged_bytes: int = 0
    """What the VM's quota counts of it: file bytes and symlink targets, a hard-linked object
    once (`bytes` counts the files' alone)."""
    over_quota: QuotaShortfall | None = None
    """A dry run's verdict: the import would not fit the VM's quota (None: it fits, or the
    VM has none). A real import raises `ImportOverQuota` instead."""

    @property
    def entries(self) -> int:
        """Names copied (or, in a dry run, that would be), the source's top excepted."""
        return self.files + self.dirs + self.symlinks + self.hardlinks + self.specials


@dataclass(frozen=True, slots=True)
class QuotaShortfall:
    """An import that would not fit VM `vm`'s quota (bytes: the only quota a VM has): it
    holds `used` bytes of its `quota`, the import charges `needed` more, and it fits in
    `fitting_quota` and no less (`_Counter.quota_needed`)."""

    vm: str
    quota: int
    used: int
    needed: int
    fitting_quota: int

    @property
    def shortfall(self) -> int:
        """How many bytes more than the quota allows."""
        return self.fitting_quota - self.quota


class ImportOverQuota(QuotaExceeded):
    """Found by the pre-scan, before anything is staged (an import that outgrows the quota
    while it copies, as a running VM writes meanwhile, fails with `QuotaExceeded` and
    discards what it staged)."""

    def __init__(self, over: QuotaShortfall) -> None:
        super().__init__(
            f"importing into {over.vm} needs {over.needed} bytes, {over.shortfall} more than "
            f"its quota of {over.quota} bytes allows ({over.used} used); raise it with `prism "
            f"vm set {over.vm} --quota SIZE` or leave things out with --exclude (nothing was "
            "imported)"
        )
        self.over = over


@dataclass(frozen=True, slots=True)
class Exclude:
    """One --exclude PATTERN: shell wildcards (`*`, `?`, `[...]`), case-sensitive. Without
    a '/', it matches an entry's name at any depth (`*.log`, `.cache`); with one, the
    entry's path from the source's top, component by component, so `*` never matches '/'
    (`/var/cache`, `home/*/.cache`; the leading '/' is optional). A trailing '/' matches
    directories only (`tmp/`)."""

    text: str
    parts: tuple[str, ...]
    anchored: bool
    dirs_only: bool

    @classmethod
    def parse(cls, text: str) -> Exclude:
        body = text.rstrip("/")
        parts = tuple(p for p in body.split("/") if p not in ("", "."))
        if not parts:
            raise ValueError(
                f"--exclude {text!r} names nothing; give a name such as '*.log' or a path "
                "from the source's top such as /var/cache"
            )
        if ".." in parts:
            raise ValueError(
                f"--exclude {text!r}: '..' cannot name an entry inside the source; give its "
                "path from the source's top"
            )
        return cls(text, parts, anchored="/" in body, dirs_only=body != text)

    def matches(self, path: tuple[str, ...], is_dir: bool) -> bool:
        """Whether the entry at `path` (its names from the source's top) is excluded."""
        if self.dirs_only and not is_dir:
            return False
        if not self.anchored:
            return fnmatchcase(path[-1], self.parts[0])
        return len(path) == len(self.parts) and all(map(fnmatchcase, path, self.parts))


@dataclass(frozen=True, slots=True)
class Boundary:
    """Where the source's filesystem ends: its device, and the mount points inside it (as
    names from its top; empty unless `Selection.one_file_system`)."""

    dev: int
    mounts: frozenset[tuple[str, ...]] = frozenset()

    @classmethod
    def of(cls, src: Path, src_fd: int, *, find_mounts: bool) -> Boundary:
        return cls(os.fstat(src_fd).st_dev, _mounts_under(src) if find_mounts else frozenset())


_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _mounts_under(src: Path) -> frozenset[tuple[str, ...]]:
    """The mount points strictly inside `src` (field 5 of /proc/self/mountinfo, whose
    space, tab, newline and backslash are octal escapes), as names from `src`."""
    top = os.fsencode(os.path.realpath(src)).rstrip(b"/") + b"/"
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:  # no /proc: device numbers alone tell filesystems apart
        return frozenset()
    found = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        point = _MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), fields[4])
        if point.startswith(top) and len(point) > len(top):
            found.add(tuple(os.fsdecode(point[len(top) :]).split("/")))
    return frozenset(found)


class Verdict(enum.Enum):
    TAKE = "take"
    EXCLUDE = "exclude"
    MOUNT_POINT = "mount point"


@dataclass(frozen=True, slots=True)
class Selection:
    """What a walk of the source takes (see the module doc)."""

    exclude: tuple[Exclude, ...] = ()
    one_file_system: bool = False
    """Stay on the source's filesystem: enter no mount point (see `Boundary`)."""

    def verdict(self, path: tuple[str, ...], st: os.stat_result, top: Boundary) -> Verdict:
        is_dir = stat.S_ISDIR(st.st_mode)
        if any(pattern.matches(path, is_dir) for pattern in self.exclude):
            return Verdict.EXCLUDE
        if self.one_file_system and (st.st_dev != top.dev or path in top.mounts):
            return Verdict.MOUNT_POINT
        return Verdict.TAKE


class Progress(Protocol):
    """What an import reports as it goes (`prism.cli.progress` draws it). Called often;
    the display decides how often to draw."""

    def scanning(self, found: ImportReport) -> None:
        """The pre-scan has found `found` so far."""

    def importing(self, total: ImportReport) -> None:
        """The pre-scan is over and found `total`; the copy begins."""

    def advance(self, done: ImportReport) -> None:
        """The copy has done `done` so far."""

    def close(self) -> None:
        """The import ended (done, failed or interrupted)."""


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


class _Visitor(Protocol):
    """What `_walk` tells about each entry it takes, in walk order."""

    report: ImportReport

    def enter(self, name: str, st: os.stat_result) -> None:
        """A directory of the current one, entered: what follows until `leave` is in it."""

    def leave(self) -> None:
        """The current directory is complete (the source's top last)."""

    def entry(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        """A non-directory `name` in the current directory, open as `dir_fd`."""

    def mount_point(self, name: str, st: os.stat_result) -> None:
        """A directory on another filesystem, not entered."""


def _walk(src_fd: int, select: Selection, top: Boundary, visitor: _Visitor, label: str) -> None:
    """Walk the directory open as `src_fd` (named `label` in messages) for `visitor`:
    depth first, in name order, one open directory per level, never entering what
    `select` leaves out. Entries that change under the walk are skipped and reported."""
    report = visitor.report
    stack: list[tuple[int, list[str], tuple[str, ...], str]] = [
        (src_fd, sorted(os.listdir(src_fd), reverse=True), (), label)
    ]
    try:
        while stack:
            dir_fd, names, parts, where = stack[-1]
            if not names:
                if dir_fd != src_fd:
                    os.close(dir_fd)
                stack.pop()
                visitor.leave()
                continue
            name = names.pop()
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                path = (*parts, name)
                verdict = select.verdict(path, st, top)
                if verdict is Verdict.EXCLUDE:
                    report.excluded += 1
                elif verdict is Verdict.MOUNT_POINT:
                    report.mount_points.append("/" + "/".join(path))
                    if stat.S_ISDIR(st.st_mode):
                        visitor.mount_point(name, st)
                elif stat.S_ISDIR(st.st_mode):
                    sub_fd = _open_verified(name, dir_fd, _OPEN_DIR, st)
                    try:
                        listing = sorted(os.listdir(sub_fd), reverse=True)
                        visitor.enter(name, st)
                    except BaseException:
                        os.close(sub_fd)
                        raise
                    stack.append((sub_fd, listing, path, f"{where}{name}/"))
                else:
                    visitor.entry(dir_fd, name, st)
            except FileNotFoundError:
                report.skipped.append(f"{where}{name} (removed during the import)")
            except _Changed as exc:
                report.skipped.append(f"{where}{name} ({exc})")
    finally:
        for dir_fd, *_ in stack:
            if dir_fd != src_fd:
                os.close(dir_fd)


class _Counter:
    """Adds up what `_Importer` would copy, from the walk's lstat alone."""

    def __init__(self, progress: Progress | None) -> None:
        self.report = ImportReport()
        self.progress = progress
        self.linked: set[tuple[int, int]] = set()
        self.last_made_at = 0
        """Charged bytes before the last object the import makes without bytes (the staged
        directory first): the store makes none in a VM at its quota."""

    def quota_needed(self, used: int) -> int:
        """The smallest quota a VM holding `used` bytes takes this import in: the store
        refuses a change that would exceed its quota, and any new object (but a link or a
        symlink, which has bytes) when the VM is at its quota (`check_quota`)."""
        return max(used + self.report.charged_bytes, used + self.last_made_at + 1)

    def _made(self, nbytes: int) -> None:
        if nbytes == 0:
            self.last_made_at = self.report.charged_bytes
        self.report.charged_bytes += nbytes

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.scanning(self.report)

    def enter(self, name: str, st: os.stat_result) -> None:
        self.report.dirs += 1
        self._made(0)
        self._tick()

    def leave(self) -> None:
        pass

    def mount_point(self, name: str, st: os.stat_result) -> None:
        self.enter(name, st)

    def entry(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        r = self.report
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in self.linked:
                r.hardlinks += 1
                self._tick()
                return
            self.linked.add(key)
        if stat.S_ISREG(st.st_mode):
            r.files += 1
            r.bytes += st.st_size
            self._made(0)  # made empty, then written
            r.charged_bytes += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            r.symlinks += 1
            self._made(st.st_size)  # the target's length
        else:
            r.specials += 1
            self._made(0)
        self._tick()


class _Importer:
    """Recreates what the walk takes under the staged directory `top`."""

    def __init__(
        self, store: Store, top: ObjectId, top_st: os.stat_result, progress: Progress | None
    ) -> None:
        self.store = store
        self.report = ImportReport()
        self.progress = progress
        self.links: dict[tuple[int, int], ObjectId] = {}
        self.dirs: list[tuple[ObjectId, os.stat_result]] = [(top, top_st)]
        """The directories being filled, outermost first; times are set on leaving."""
        self.pending_bytes = 0
        self.pending_ops = 0
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
        if self.progress is not None:
            self.progress.advance(self.report)

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

    def enter(self, name: str, st: os.stat_result) -> None:
        attr = self.store.mkdir(self.dirs[-1][0], os.fsencode(name), stat.S_IMODE(st.st_mode))
        self.report.dirs += 1
        self.dirs.append((attr.oid, st))
        self._tick()

    def leave(self) -> None:
        oid, st = self.dirs.pop()
        self._owner_times(oid, st)  # last: nothing more is made in it

    def mount_point(self, name: str, st: os.stat_result) -> None:
        self.enter(name, st)
        self.leave()

    def entry(self, dir_fd: int, name: str, st: os.stat_result) -> None:
        mode = st.st_mode
        bname = os.fsencode(name)
        dir_oid = self.dirs[-1][0]
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
            self.report.charged_bytes += len(target)
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
                self.report.charged_bytes += len(data)
                self._tick(len(data))
            self._owner_times(attr.oid, st)
        finally:
            os.close(fd)
        self.report.files += 1
        self._tick()
        return attr.oid


def _top_names(src_fd: int, select: Selection, top: Boundary) -> list[str]:
    """The names the import would create at its destination."""
    names = []
    for name in os.listdir(src_fd):
        try:
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        verdict = select.verdict((name,), st, top)
        if verdict is Verdict.TAKE or (verdict is Verdict.MOUNT_POINT and stat.S_ISDIR(st.st_mode)):
            names.append(name)
    return names


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


def _over_quota(
    store: Store, vm: str, quota: int | None, counted: _Counter
) -> QuotaShortfall | None:
    """Whether the import `counted` found would not fit `vm`'s quota (None: it fits)."""
    if quota is None:
        return None
    used = store.usage(vm).logical_bytes
    fitting = counted.quota_needed(used)
    if fitting <= quota:
        return None
    return QuotaShortfall(vm, quota, used, counted.report.charged_bytes, fitting)


def import_tree(
    store: Store,
    vm: str,
    src: Path,
    to: str = "/",
    *,
    select: Selection = Selection(),
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ImportReport:
    """Copy host directory `src` into VM `vm` at absolute path `to`; see the module doc.
    With `dry_run`, only walk it and return what the import would copy (the store is not
    written), and whether it would fit the VM's quota. With `progress`, or when the VM has
    a quota, a pre-scan first finds the totals: the progress shows them, and an import
    that would not fit the quota raises `ImportOverQuota` before anything is staged."""
    start = time.perf_counter()
    info = store.namespace(vm)
    if info.readonly:
        raise ReadOnly(f"{vm} is a read-only snapshot; import into a VM")
    label = f"{vm}:{to.rstrip('/')}/"
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top = Boundary.of(src, src_fd, find_mounts=select.one_file_system)
        _refuse_clashes(store, vm, to, _top_names(src_fd, select, top))
        if dry_run or progress is not None or info.quota is not None:
            counter = _Counter(progress)
            _walk(src_fd, select, top, counter, label)
            over = _over_quota(store, vm, info.quota, counter)
            scan_seconds = time.perf_counter() - start
            if dry_run:
                counter.report.dry_run = True
                counter.report.over_quota = over
                counter.report.seconds = counter.report.scan_seconds = scan_seconds
                return counter.report
            if over is not None:
                raise ImportOverQuota(over)
            if progress is not None:
                progress.importing(counter.report)
        else:
            scan_seconds = 0.0
        store.reap_stagings()
        staged, token, lock_fd = store.begin_staging(vm)
        importer = _Importer(store, staged, os.fstat(src_fd), progress)
        try:
            store.begin_batch()
            _walk(src_fd, select, top, importer, label)
            store.commit()
            store.publish_staging(token, to)
        except BaseException:
            store.abort()
            store.discard_staging(token)
            raise
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
    finally:
        os.close(src_fd)
        if progress is not None:
            progress.close()
    importer.report.scan_seconds = scan_seconds
    importer.report.seconds = time.perf_counter() - start
    return importer.report
