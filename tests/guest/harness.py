"""Boot a throwaway Linux guest under QEMU and run a shell script in it.

Theory of operation
-------------------
``scripts/build-guest.sh`` caches a Debian cloud kernel and a base initramfs (busybox-static,
the NFS client and virtio-net modules, and an ``/init``) in ``.cache/guest/``. For each run we
append a second gzip'd cpio archive holding ``/workload.sh`` (and any extra files); the kernel
unpacks concatenated archives in order, so the base image is never rewritten.

QEMU boots with user networking by default: the guest is 10.0.2.15, and 10.0.2.2 is the host's
loopback, so a server the test binds on 127.0.0.1 is reachable from the guest at 10.0.2.2.
Connections arrive at the host from an ordinary (non-privileged) port, and nothing can connect
to the guest, so every such guest is the same client, 127.0.0.1, that no server can call back.
With a ``TapNetwork`` the guest's NIC is a tap device in a network namespace instead (QEMU runs
in that namespace) and ``/init`` gives it the static address passed on the kernel command line
(``prism.ip=``, see scripts/build-guest.sh): each guest is a client of its own, as a server in
the namespace sees it, and reachable for callbacks. ``tests.guest.lan.GuestLan`` builds such a
namespace: a bridge holding the server's address and one tap per guest. The serial console
is captured to a file; ``/init`` ends with ``PRISM-GUEST-EXIT <code>`` and powers off, which
ends QEMU.

``run_guest`` runs one script per boot. A ``GuestSession`` keeps the guest up and runs
commands on demand, so one boot serves many test steps: its workload is a loop reading
commands from the second serial port (ttyS1, a unix socket on the host) in raw mode, one
line each (``<n> <base64 of the command>``), sourcing each in the same shell (so ``$!`` and
``wait`` span commands) and answering ``PRISM-RC <n> <status> <base64 of the output>``.

``/dev/kvm`` is used only when the kvm_intel or kvm_amd module is loaded (some hosts expose a
``/dev/kvm`` that cannot boot a stock kernel); otherwise QEMU uses TCG, which boots and loads
the modules in a few seconds. Set ``PRISM_GUEST_ACCEL=tcg|kvm`` to override.

Whose fault: ``GuestImageError`` (the image could not be built), ``GuestSetupError`` (the
guest's own /init failed before the workload ran), ``GuestTimeout`` (the run, or a session
command, exceeded its budget; a timed-out run's QEMU was killed), ``GuestCrash`` (QEMU ended
without the exit marker). A workload or command that fails is not an error: its exit code is
in ``GuestRun.exit_code`` / ``CommandResult.exit_code``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

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

CONTROL_MARKER = "PRISM-GUEST-CONTROL"
#: Seconds a GuestSession waits for its guest to boot into the command loop.
SESSION_BOOT_TIMEOUT = 240.0
#: Seconds after which a GuestSession's guest powers itself off.
SESSION_LIFETIME = 3600.0

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


@dataclass(frozen=True, slots=True)
class TapNetwork:
    """The guest's NIC on tap device ``tap`` (existing, persistent) in network namespace
    ``netns``, where QEMU then runs; the guest gives itself ``address``/``prefixlen``."""

    netns: str
    tap: str
    address: str
    prefixlen: int
    gateway: str = ""  # the guest's default route, if any
    hostname: str = "prism-guest"  # the guest's name (NLM caller_name, NSM mon_name)

    @property
    def mac(self) -> str:
        """A locally administered MAC from the address, so guests on one bridge differ."""
        tail = ipaddress.IPv4Address(self.address).packed[1:]
        return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)

    def kernel_args(self) -> str:
        """What /init reads to configure eth0 and the hostname (an empty gw: no route)."""
        return (
            f"prism.ip={self.address}/{self.prefixlen} prism.gw={self.gateway} "
            f"prism.hostname={self.hostname}"
        )

    def qemu_args(self) -> list[str]:
        return [
            "-netdev",
            f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={self.mac},romfile=",
        ]

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (where the tap is)."""
        return ["ip", "netns", "exec", self.netns, *argv]


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
    net: TapNetwork | None = None,
    qemu_args: Sequence[str] = (),
) -> GuestRun:
    """Boot the guest, run ``script`` with busybox ``sh`` as root, and return its exit code.

    The script's stdin is /dev/null and its stdout/stderr go to the serial console, which is
    a tty: keep output to text lines. ``timeout`` covers the whole run, boot included.
    ``files`` maps absolute guest paths to contents (e.g. helper scripts; mode 0755).
    ``console_log`` keeps the raw console in a file of your choosing (default: a temp file).
    ``net`` puts the guest on a tap device with its own address (default: user networking).
    ``qemu_args`` are added to QEMU's command line (devices, e.g. an ivshmem ring).
    """
    with tempfile.TemporaryDirectory(prefix="prism-guest-") as tmp:
        initrd = _initrd(Path(tmp), script, files)
        log_path = console_log or Path(tmp) / "console.log"
        stderr_path = Path(tmp) / "qemu.stderr"
        argv = _qemu_argv(initrd, memory_mb, cpus, kernel_args, net) + list(qemu_args)

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


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_code: int
    #: The command's stdout and stderr, interleaved.
    output: str
    #: Wall-clock seconds from sending the command to its answer.
    elapsed: float


#: Starts each command line. ash's ``read`` restarts a line from scratch when a signal (a
#: background job's SIGCHLD) interrupts it, dropping the bytes already read: a line that does
#: not start with the tag lost its start, was not run, and is answered GARBLED_TAG; the host
#: sends it again. (Neither tag can occur inside the base64 or the number that follow.)
COMMAND_TAG = "PRISM-CMD"
GARBLED_TAG = "PRISM-GARBLED"
#: Times one command is sent again after arriving garbled before the session gives up.
GARBLED_RESENDS = 5

_CONTROL_LOOP = f"""
( sleep "$1"; echo "PRISM-GUEST-LIFETIME-OVER"; poweroff -f ) </dev/null &
exec 3<>/dev/ttyS1
stty raw -echo <&3 || exit 90
echo {CONTROL_MARKER}
while read -r _prism_tag _prism_id _prism_cmd <&3; do
    if [ "$_prism_tag" != {COMMAND_TAG} ]; then echo {GARBLED_TAG} >&3; continue; fi
    echo "$_prism_cmd" | base64 -d > /tmp/.prism-cmd
    . /tmp/.prism-cmd </dev/null >/tmp/.prism-out 2>&1
    _prism_rc=$?
    echo "PRISM-RC $_prism_id $_prism_rc $(base64 /tmp/.prism-out | tr -d '\\n')" >&3
done
"""
_RC_RE = re.compile(rb"^PRISM-RC (\d+) (-?\d+) ?([A-Za-z0-9+/=]*)\r?$")
_GARBLED_RE = re.compile(rb"^%s\r?$" % GARBLED_TAG.encode())


class GuestSession:
    """A booted guest that runs shell commands on demand; see the module docstring.

    ``with GuestSession(files=..., net=...) as g: g.run("mount ...")``. Commands run as root
    in one busybox shell, in order; a command must not ``exit`` (that ends the guest) and
    should redirect the output of anything it leaves running in the background. ``kill()``
    is pulling the plug (QEMU killed); ``start()`` boots again with the same files and
    network. ``console`` is the serial console so far (kernel messages included). The
    guest powers itself off after ``lifetime`` seconds, so that a test process killed
    before ``close()`` leaves no QEMU running on.
    """

    def __init__(
        self,
        *,
        files: Mapping[str, bytes | str] | None = None,
        net: TapNetwork | None = None,
        memory_mb: int = 512,
        cpus: int = 1,
        kernel_args: str = "",
        name: str = "guest",
        lifetime: float = SESSION_LIFETIME,
        qemu_args: Sequence[str] = (),
    ) -> None:
        self.files = dict(files or {})
        self.qemu_args = list(qemu_args)  # added to QEMU's command line (devices)
        self.lifetime = lifetime
        self.net = net
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.kernel_args = kernel_args
        self.name = name
        self.boots = 0
        #: Seconds the last start() took, QEMU start to the command loop.
        self.boot_seconds = 0.0
        self._dir = Path(tempfile.mkdtemp(prefix="pg-"))  # short: unix socket paths are short
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._serial = 0  # numbers commands, so a late answer is never taken for the next
        #: Command lines the guest's shell lost the start of (and that were sent again).
        self.garbled_lines = 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def console_path(self) -> Path:
        return self._dir / f"console-{self.boots}.log"

    @property
    def console(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            raw = self.console_path.read_bytes()
            return raw.decode("utf-8", "replace").replace("\r\n", "\n")
        return ""

    def start(self, files: Mapping[str, bytes | str] | None = None) -> Self:
        """Boot (again), adding ``files`` to those given at construction for this boot, and
        wait until the guest reads commands."""
        if self.running:
            raise GuestError(f"{self.name} is already running")
        self.boots += 1
        control = self._dir / "control.sock"
        control.unlink(missing_ok=True)
        script = f"set -- {int(self.lifetime)}\n{_CONTROL_LOOP}"
        initrd = _initrd(self._dir, script, {**self.files, **(files or {})})
        argv = _qemu_argv(initrd, self.memory_mb, self.cpus, self.kernel_args, self.net)
        argv += ["-chardev", f"socket,id=ctl,path={control},server=on,wait=off"]
        argv += ["-serial", "chardev:ctl", *self.qemu_args]
        started = time.monotonic()
        with self.console_path.open("wb") as log, (self._dir / "qemu.stderr").open("wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=err)
        deadline = started + SESSION_BOOT_TIMEOUT
        try:
            while f"{CONTROL_MARKER}\n" not in self.console:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise GuestTimeout(
                        f"{self.name} did not boot within {SESSION_BOOT_TIMEOUT:g} s",
                        self.console,
                    )
                time.sleep(0.1)
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.connect(str(control))
            self._buffer = b""
        except BaseException:
            self.kill()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def run(self, command: str, *, timeout: float = 60.0) -> CommandResult:
        """Run ``command`` (shell text, any number of lines) and wait for its answer."""
        if self._sock is None or not self.running:
            raise GuestError(f"{self.name} is not running", self.console)
        started = time.monotonic()
        self._serial += 1
        line_out = b"%s %d %s\n" % (
            COMMAND_TAG.encode(),
            self._serial,
            base64.b64encode(command.encode()),
        )
        self._sock.sendall(line_out)
        resends = 0
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                m = _RC_RE.match(line)
                if m and int(m[1]) == self._serial:
                    output = base64.b64decode(m[3]).decode("utf-8", "replace")
                    return CommandResult(int(m[2]), output, time.monotonic() - started)
                if _GARBLED_RE.match(line):
                    self.garbled_lines += 1
                    resends += 1
                    if resends > GARBLED_RESENDS:
                        raise GuestError(
                            f"{self.name}: {command!r} arrived garbled {resends} times",
                            self.console,
                        )
                    self._sock.sendall(line_out)  # it was not run: send it again
                continue  # the late answer to a command that timed out: skip it
            left = started + timeout - time.monotonic()
            if left <= 0:
                raise GuestTimeout(
                    f"{self.name}: no answer in {timeout:g} s to {command!r}", self.console
                )
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                self._check_alive()
                continue
            if not chunk:
                self._check_alive()
                raise GuestCrash(f"{self.name}: control port closed", self.console)
            self._buffer += chunk

    def send_raw_line_for_test(self, line: bytes) -> None:
        """Write ``line`` to the control port as is (a test of the framing itself)."""
        if self._sock is None:
            raise GuestError(f"{self.name} is not running", self.console)
        self._sock.sendall(line)

    def check(self, command: str, *, timeout: float = 60.0) -> str:
        """``run`` that raises unless the command exits 0; returns its output."""
        result = self.run(command, timeout=timeout)
        if result.exit_code != 0:
            raise GuestError(
                f"{self.name}: {command!r} exited {result.exit_code}:\n{result.output}",
                self.console,
            )
        return result.output

    def kill(self) -> None:
        """Pull the plug: QEMU is killed, the guest gets no chance to say goodbye."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            rc = self._proc.returncode
            stderr = (self._dir / "qemu.stderr").read_text("utf-8", "replace").strip()
            self._proc = None
            setup = _SETUP_FAILED_RE.findall(self.console)
            if setup:
                raise GuestSetupError(
                    f"{self.name}: setup failed: {'; '.join(setup)}", self.console
                )
            detail = f"; QEMU stderr: {stderr}" if stderr else ""
            raise GuestCrash(f"{self.name}: QEMU exited with status {rc}{detail}", self.console)


def start_all(sessions: Iterable[GuestSession]) -> None:
    """Boot ``sessions`` side by side; raise the first failure once all have finished."""
    errors: list[BaseException] = []

    def boot(session: GuestSession) -> None:
        try:
            session.start()
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


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


def _initrd(directory: Path, script: str, files: Mapping[str, bytes | str] | None) -> Path:
    """The base initramfs plus an archive of ``/workload.sh`` and ``files``, in ``directory``."""
    image = ensure_guest_image()
    extra: dict[str, bytes] = {"/workload.sh": script.encode()}
    for path, content in (files or {}).items():
        if not path.startswith("/") or path == "/workload.sh":
            raise ValueError(f"guest file path must be absolute and not /workload.sh: {path!r}")
        extra[path] = content.encode() if isinstance(content, str) else content
    initrd = directory / "initrd.cpio.gz"
    with initrd.open("wb") as out:
        out.write(image.initrd.read_bytes())
        out.write(gzip.compress(newc_archive(extra.items()), compresslevel=1, mtime=0))
    return initrd


def _qemu_argv(
    initrd: Path, memory_mb: int, cpus: int, kernel_args: str, net: TapNetwork | None
) -> list[str]:
    image = ensure_guest_image()
    qemu = shutil.which(QEMU_BINARY)
    if qemu is None:
        raise GuestError(f"{QEMU_BINARY} not found: apt-get install -y qemu-system-x86")
    if net is not None:
        kernel_args = f"{net.kernel_args()} {kernel_args}"
    nic = (
        net.qemu_args()
        if net is not None
        else [
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",  # no iPXE option ROM: we boot -kernel
        ]
    )
    accel = qemu_accel()
    argv = [
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
        *nic,
        "-no-reboot",
    ]
    return net.command(argv) if net is not None else argv


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
