"""Guest ring files: the memory of VRPC guest channels, named files on tmpfs that outlive a
server's run, so that a guest's QEMU, which maps the file, carries on across a restart.

Layout. One directory per data directory, `/dev/shm/prism-vrpc-<h>` where `<h>` is 16 hex
digits of the SHA-256 of the data directory's real path (`ring_dir`; a server without one uses
a temporary directory there, removed at its stop), mode 0700, owned by the server's user, and
in it one file per VM with a guest channel, `vm-<namespace id>.ring`, mode 0600,
`GUEST_SEGMENT_SIZE` bytes (sparse: memory is taken as pages are touched). The VM a ring is
bound to is the id in its name, which only the server writes (the directory is its own);
nothing read from a file is trusted, as nothing read from any ring is.

Life. `GuestRings.open(vm)` opens the VM's file, checked (`O_NOFOLLOW`; a regular file of the
server's user with one link and the expected size, else it is replaced by a new one), or makes
it, and maps it shared; the server then initialises a ring in it, a reset that the guest sees
(a new boot id and channel id in the header). A server stop keeps the files (QEMU still maps
them): at the next start the server re-adopts those whose VM still exists (`vm_ids`) and
removes the others (`remove`), as it removes a VM's file when the VM is removed while it runs.

Owners. A QEMU that runs as neither root nor the server's user (libvirt's `libvirt-qemu`)
cannot open such a file: root may give a VM's ring file to another user and group
(`prism vm vrpc-guest NAME --owner USER[:GROUP]`, `give`). The choice is recorded in
`DATA/vrpc-guests.json` (`{"owners": {"<VM id>": [uid, gid]}}`, replaced whole, fsync'd), so
that a re-adopted or new file gets it again, and the directory is then 0711 (others may
traverse it to the files they own, not list it). Adoption checks a file's owner against the
record.

Unlike a memfd, a named file cannot be sealed against shrinking: whoever may open it (the
server's user, root, and the owner given) can truncate it under a running server, which then
dies of SIGBUS; give a ring only to the user its VM's QEMU runs as. Nobody else can open it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from vrpc.ring import Segment

log = logging.getLogger("prism.vrpc")

SHM = Path("/dev/shm")
"""Where the ring directories live: tmpfs, so that a ring's memory is never written to disk."""
_NAME = re.compile(r"vm-([1-9][0-9]{0,9})\.ring")
RECORD = "vrpc-guests.json"
"""The owners given to guest rings, in the data directory."""


class GuestRingError(Exception):
    """Guest rings cannot be kept where they belong (the message says what to do)."""


def ring_dir(data: Path) -> Path:
    """The directory of the guest rings of the server on `data`."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(data))).hexdigest()[:16]
    return SHM / f"prism-vrpc-{digest}"


def ring_name(vm: int) -> str:
    return f"vm-{vm}.ring"


class GuestRings:
    """The ring files of one server (see the module docstring); single-threaded."""

    def __init__(self, data: Path | None, size: int) -> None:
        self.size = size
        self.path = ring_dir(data) if data is not None else None
        self._temporary = data is None
        self._dir = -1
        self._record = Path(data) / RECORD if data is not None else None
        self.owners: dict[int, tuple[int, int]] = {}
        """The uid and gid given to each VM's ring file (absent: the server's user)."""
        try:
            raw = json.loads(self._record.read_bytes()) if self._record else {}
            self.owners = {int(vm): (int(u), int(g)) for vm, (u, g) in raw["owners"].items()}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            what = "guest rings go to the server's user until `vrpc-guest --owner` is given again"
            log.warning("vrpc: %s is damaged (%s): %s", self._record, exc, what)

    def owner(self, vm: int) -> tuple[int, int]:
        """Who `vm`'s ring file belongs to: the recorded owner, else the server's user."""
        return self.owners.get(vm, (os.geteuid(), os.getegid()))

    def give(self, vm: int, owner: tuple[int, int] | None) -> None:
        """Give `vm`'s ring file to uid:gid `owner` (None: back to the server's user), now
        if it exists and whenever it is made again; recorded first."""
        if owner is None:
            self.owners.pop(vm, None)
        else:
            self.owners[vm] = owner
        self._save()
        dirfd = self._dirfd()
        self._traversable()
        uid, gid = self.owner(vm)
        with contextlib.suppress(FileNotFoundError):
            os.chown(ring_name(vm), uid, gid, dir_fd=dirfd, follow_symlinks=False)

    def forget_others(self, vms: set[int]) -> None:
        """Drop the recorded owners of VMs not in `vms` (removed ones)."""
        if set(self.owners) - vms:
            self.owners = {vm: o for vm, o in self.owners.items() if vm in vms}
            self._save()

    def _save(self) -> None:
        if self._record is None:
            return
        body = {"owners": {str(vm): list(o) for vm, o in sorted(self.owners.items())}}
        tmp = self._record.with_name(f".{RECORD}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(body).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._record)
        dirfd = os.open(self._record.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def _dirfd(self) -> int:
        """The directory, made (0700) or checked to be the server's own, opened once."""
        if self._dir >= 0:
            return self._dir
        if self.path is None:
            self.path = Path(tempfile.mkdtemp(prefix="prism-vrpc-", dir=SHM))
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path, 0o700)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise GuestRingError(
                f"cannot keep guest rings in {self.path}: {exc.strerror}; it must be a directory"
                f" on tmpfs ({SHM}) that the server's user may create"
            ) from exc
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o066:
            os.close(fd)
            raise GuestRingError(
                f"{self.path} is not this server's own (owner uid {st.st_uid}, mode"
                f" {stat.S_IMODE(st.st_mode):04o}; want uid {os.geteuid()}, 0700 or 0711):"
                " remove it and ask again (its guests must then restart their QEMU)"
            )
        self._dir = fd
        return fd

    def _traversable(self) -> None:
        """Let the owners given reach their files (0711: traverse, not list)."""
        os.fchmod(self._dirfd(), 0o711 if self.owners else 0o700)

    def mem_path(self, vm: int) -> str:
        """The path QEMU opens for `vm`'s ring (`memory-backend-file,mem-path=`)."""
        self._dirfd()
        return str(Path(str(self.path)) / ring_name(vm))

    def open(self, vm: int) -> Segment:
        """`vm`'s ring file, mapped: the existing one if it passes the checks, else new."""
        dirfd = self._dirfd()
        name = ring_name(vm)
        fd = self._existing(dirfd, vm, name)
        if fd < 0:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dirfd,
            )
        try:
            if os.fstat(fd).st_size == 0:
                os.ftruncate(fd, self.size)
                os.fchown(fd, *self.owner(vm))
            self._traversable()
            buf = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return Segment(fd, buf)

    def _existing(self, dirfd: int, vm: int, name: str) -> int:
        """The open file `name` if it is a ring this server made, else -1 (removed if there)."""
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except FileNotFoundError:
            return -1
        except OSError as exc:  # ELOOP: a symlink
            why = exc.strerror
        else:
            st = os.fstat(fd)
            if (
                stat.S_ISREG(st.st_mode)
                and (st.st_uid, st.st_gid) == self.owner(vm)
                and st.st_nlink == 1
                and st.st_size == self.size
            ):
                return fd
            os.close(fd)
            why = f"type {stat.S_IFMT(st.st_mode):o}, uid {st.st_uid}, {st.st_size} bytes"
        log.warning(
            "vrpc: %s/%s is not a guest ring of this server (%s): replaced", self.path, name, why
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)
        return -1

    def vm_ids(self) -> list[int]:
        """The VMs whose ring files are there (files of other names are left alone); none
        if the directory was never made (it is made at the first guest channel)."""
        if self._dir < 0 and (self.path is None or not self.path.exists()):
            return []
        dirfd = self._dirfd()
        found = (_NAME.fullmatch(name) for name in os.listdir(dirfd))
        return sorted(int(m[1]) for m in found if m)

    def remove(self, vm: int) -> None:
        """Remove `vm`'s ring file (its VM is gone; a QEMU that maps it keeps its memory)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ring_name(vm), dir_fd=self._dirfd())
        if self.owners.pop(vm, None) is not None:
            self._save()

    def close(self) -> None:
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1
        if self._temporary and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
