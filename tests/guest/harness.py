"""Boot a throwaway Linux guest under QEMU and run a shell script in it.

Theory of operation
-------------------
``scripts/build-guest.sh`` caches a Debian cloud kernel and a base initramfs (busybox-static,
the NFS client and virtio-net modules, and an ``/init``) in ``.cache/guest/``. For each run we
append a second gzip'd cpio archive holding ``/workload.sh`` (and any extra files); the kernel
unpacks concatenated archives in order, so the base image is never rewritten.

QEMU boots with user networking: the guest is 10.0.2.15, and 10.0.2.2 is the host's loopback,
so a server the test binds on 127.0.0.1 is reachable from the guest at 10.0.2.2. Connections
arrive at the host from an ordinary (non-privileged) port. The serial console is captured to a
file; ``/init`` ends with ``PRISM-GUEST-EXIT <code>`` and powers off, which ends QEMU.

``/dev/kvm`` is used only when the kvm_intel or kvm_amd module is loaded (some hosts expose a
``/dev/kvm`` that cannot boot a stock kernel); otherwise QEMU uses TCG, which boots and loads
the modules in a few seconds. Set ``PRISM_GUEST_ACCEL=tcg|kvm`` to override.

Whose fault: ``GuestImageError`` (the image could not be built), ``GuestSetupError`` (the
guest's own /init failed before the workload ran), ``GuestTimeout`` (the run exceeded its
budget; QEMU was killed), ``GuestCrash`` (QEMU ended without the exit marker). A workload that
fails is not an error: its exit code is in ``GuestRun.exit_code``.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"
CACHE_DIR = Path(os.environ.get("PRISM_GUEST_CACHE", REPO_ROOT / ".cache" / "guest"))

#: Addresses as QEMU user networking lays them out.
GUEST_ADDR = "10.0.2.15"
HOST_ADDR = "10.0.2.2"

#: Lines /init prints; a workload must not print lines starting with these.
START_MARKER = "PRISM-GUEST-START"
EXIT_MARKER = "PRISM-GUEST-EXIT"
SETUP_FAILED_MARKER = "PRISM-GUEST-SETUP-FAILED"

KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
QEMU_BINARY = "qemu-system-x86_64"
#: Console lines quoted in an exception message.
ERROR_TAIL_LINES = 40

_EXIT_RE = re.compile(rf"^{EXIT_MARKER} (-?\d+)\s*$", re.MULTILINE)
_SETUP_FAILED_RE = re.compile(rf"^{SETUP_FAILED_MARKER} (.*)$", re.MULTILINE)


class GuestError(RuntimeError):
    """A guest run went wrong; ``output`` holds the console seen so far."""

    def __init__(self, message: str, output: str = "") -> None:
        if output:
            tail = "\n".join(output.splitlines()[-ERROR_TAIL_LINES:])
            message = f"{message}\n--- guest console (last {ERROR_TAIL_LINES} lines) ---\n{tail}"
        super().__init__(message)
        self.output = output


class GuestImageError(GuestError):
    """The kernel/initramfs could not be built: see scripts/build-guest.sh's output."""


class GuestSetupError(GuestError):
    """The guest's /init failed (modules, network) before the workload ran."""


class GuestTimeout(GuestError):
    """The run exceeded its timeout; QEMU was killed."""


class GuestCrash(GuestError):
    """QEMU exited without the exit marker (kernel panic, QEMU error)."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_release: str
    info: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GuestRun:
    exit_code: int
    #: The whole serial console, with CRLF turned into LF (kernel messages included).
    output: str
    #: Wall-clock seconds from starting QEMU to its exit.
    elapsed: float = 0.0

    @property
    def workload_output(self) -> str:
        """The console from the start of /workload.sh up to (not including) the exit marker."""
        start = self.output.find(f"{START_MARKER}\n")
        body = self.output[start + len(START_MARKER) + 1 :] if start >= 0 else self.output
        marker = body.rfind(f"{EXIT_MARKER} ")
        return body[:marker] if marker >= 0 else body


@functools.cache
def ensure_guest_image() -> GuestImage:
    """Build the guest image if it is missing or stale (once per process) and describe it."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise GuestImageError(
            f"{BUILD_SCRIPT} failed with exit code {proc.returncode}; run it by hand to see why",
            proc.stdout + proc.stderr,
        )
    info = _read_env(CACHE_DIR / "guest.env")
    return GuestImage(
        kernel=CACHE_DIR / "vmlinuz",
        initrd=CACHE_DIR / "base.cpio.gz",
        kernel_release=info["kernel_release"],
        info=info,
    )


def run_guest(
    script: str,
    *,
    timeout: float = 300,
    memory_mb: int = 512,
    cpus: int = 1,
    files: Mapping[str, bytes | str] | None = None,
    kernel_args: str = "",
    console_log: Path | None = None,
) -> GuestRun:
    """Boot the guest, run ``script`` with busybox ``sh`` as root, and return its exit code.

    The script's stdin is /dev/null and its stdout/stderr go to the serial console, which is
    a tty: keep output to text lines. ``timeout`` covers the whole run, boot included.
    ``files`` maps absolute guest paths to contents (e.g. helper scripts; mode 0755).
    ``console_log`` keeps the raw console in a file of your choosing (default: a temp file).
    """
    image = ensure_guest_image()
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        raise GuestError(f"{QEMU_BINARY} not found: apt-get install -y qemu-system-x86")

    extra: dict[str, bytes] = {"/workload.sh": script.encode()}
    for path, content in (files or {}).items():
        if not path.startswith("/") or path == "/workload.sh":
            raise ValueError(f"guest file path must be absolute and not /workload.sh: {path!r}")
        extra[path] = content.encode() if isinstance(content, str) else content

    with tempfile.TemporaryDirectory(prefix="prism-guest-") as tmp:
        initrd = Path(tmp) / "initrd.cpio.gz"
        with initrd.open("wb") as out:
            out.write(image.initrd.read_bytes())
            out.write(gzip.compress(newc_archive(extra.items()), compresslevel=1, mtime=0))
        log_path = console_log or Path(tmp) / "console.log"
        stderr_path = Path(tmp) / "qemu.stderr"
        argv = _qemu_argv(qemu, image, initrd, memory_mb, cpus, kernel_args)

        timed_out = False
        started = time.monotonic()
        with log_path.open("wb") as log, stderr_path.open("wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=err)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        elapsed = time.monotonic() - started
        output = log_path.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n")
        qemu_stderr = stderr_path.read_text("utf-8", "replace").strip()

    exits = _EXIT_RE.findall(output)
    if exits:
        return GuestRun(exit_code=int(exits[-1]), output=output, elapsed=elapsed)
    setup = _SETUP_FAILED_RE.findall(output)
    if setup:
        raise GuestSetupError(f"guest setup failed: {'; '.join(setup)}", output)
    if timed_out:
        raise GuestTimeout(f"guest did not finish within {timeout:g} s (QEMU killed)", output)
    detail = f"; QEMU stderr: {qemu_stderr}" if qemu_stderr else ""
    raise GuestCrash(
        f"QEMU exited with status {proc.returncode} and no {EXIT_MARKER} line{detail}", output
    )


def host_programs(paths: Iterable[str]) -> dict[str, bytes]:
    """`files` for `run_guest`: the host's programs at `paths` plus the shared libraries
    they load (their `ldd` closure, at the same paths), for daemons busybox lacks (the
    guest's rpcbind and rpc.statd are the host's Debian packages, copied in at boot)."""
    files: dict[str, bytes] = {}
    for path in paths:
        files[path] = Path(path).read_bytes()
        out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
        for lib in re.findall(r"(/\S+) \(0x", out):
            files[lib] = Path(os.path.realpath(lib)).read_bytes()
    return files


def nfs_mount_command(
    *,
    nfs_port: int,
    mount_port: int,
    export: str = "/",
    mountpoint: str = "/mnt",
    options: str = "",
) -> str:
    """A guest shell command mounting ``export`` from a server on the host's 127.0.0.1.

    Verified against this guest: busybox passes the option string to the kernel untouched
    (adding ``addr=`` if missing). ``nolock`` is required (no rpc.statd/rpcbind in the guest;
    without it mount fails with ECONNREFUSED). NFS over UDP is compiled out of this kernel
    (``proto=udp`` gives EINVAL); ``mountproto=udp`` works. Leave out ``port``/``mountport``
    (pass 0) and the kernel asks the portmapper at 10.0.2.2:111 (PMAP v2 GETPORT over TCP).
    """
    opts = ["vers=3", "proto=tcp", "nolock", f"addr={HOST_ADDR}"]
    if nfs_port:
        opts.append(f"port={nfs_port}")
    if mount_port:
        opts += ["mountproto=tcp", f"mountport={mount_port}"]
    if options:
        opts.append(options)
    source = f"{HOST_ADDR}:{export}"
    return (
        f"mkdir -p {shlex.quote(mountpoint)} && mount -t nfs -o {shlex.quote(','.join(opts))} "
        f"{shlex.quote(source)} {shlex.quote(mountpoint)}"
    )


def qemu_accel() -> str:
    """``kvm`` when a real KVM backend (kvm_intel/kvm_amd) is loaded, else ``tcg``."""
    forced = os.environ.get("PRISM_GUEST_ACCEL")
    if forced:
        return forced
    vendor_module = any(Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd"))
    if vendor_module and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg"


def _qemu_argv(
    qemu: str, image: GuestImage, initrd: Path, memory_mb: int, cpus: int, kernel_args: str
) -> list[str]:
    accel = qemu_accel()
    return [
        qemu,
        "-accel",
        accel,
        "-cpu",
        "host" if accel == "kvm" else "max",
        "-smp",
        str(cpus),
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"{KERNEL_CMDLINE} {kernel_args}".strip(),
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",  # no iPXE option ROM: we boot -kernel
        "-no-reboot",
    ]


def newc_archive(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """A cpio "newc" archive of regular files (mode 0755, root-owned), parents included."""
    files = {path.strip("/"): data for path, data in entries}
    dirs = sorted({str(p) for name in files for p in Path(name).parents if str(p) != "."})
    out = bytearray()
    ino = 0x50000  # away from the base archive's inode numbers; nlink=1 anyway
    for name in dirs:
        ino += 1
        _newc_entry(out, name, 0o040755, b"", ino)
    for name, data in sorted(files.items()):
        ino += 1
        _newc_entry(out, name, 0o100755, data, ino)
    _newc_entry(out, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


def _newc_entry(out: bytearray, name: str, mode: int, data: bytes, ino: int) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if mode & 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    out += b"070701" + b"".join(b"%08X" % value for value in fields)
    out += encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)


def _read_env(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as exc:
        raise GuestImageError(f"{path} is missing: run {BUILD_SCRIPT} --force") from exc
    return dict(line.split("=", 1) for line in lines if "=" in line)
