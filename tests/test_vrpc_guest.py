"""VRPC guest channels on the host: `prism vm vrpc-guest`, the guest client over the very memory
QEMU would map (the ring's file on tmpfs), a hostile guest scribbling on it, the channel's end
with its VM, and a server restart (clean or kill -9) that the guest client rides through.

The QEMU boot itself is `tests/test_guest_vrpc.py` (marked `guest`); here the static guest
client runs with `--mem`, so every ring word it and the server exchange is the same as in a
guest, in poll mode, against a real `prism serve` on both ring backends.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prism.nfs.const import MountStat3
from rpc.xdr import XdrError
from tests.guest.vrpc_guest import (
    GUEST_BYTES,
    fnv1a,
    guest_client,
    pattern,
    read_all,
    results,
)
from tests.server_helpers import PrismProcess, new_data_dir, prism_cli, running_server
from tests.vrpc_helpers import BACKENDS, as_user, reachable_dir, socket_of
from vrpc import abi
from vrpc.control import (
    MAX_MESSAGE,
    GuestOwner,
    GuestRequest,
    GuestRing,
    Refused,
    RefuseStatus,
    decode_guest_reply,
    encode_guest_request,
)
from vrpc.guestrings import ring_dir
from vrpc.server import STATS_SECONDS
from vrpc.stats import read_stats

_U32 = struct.Struct("=I")
SQ_TAIL = abi.RING_HEADER["sq_tail"][0]
SERVER_FLAGS = abi.RING_HEADER["server_flags"][0]
NOBODY = 65534


@pytest.fixture(scope="module", params=BACKENDS)
def srv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrismProcess]:
    backend = request.param
    base = tmp_path_factory.mktemp(f"vrpc-guest-{backend}")
    data = new_data_dir(base / "data", ["vm", "other"])
    sockdir = reachable_dir()
    server = PrismProcess(
        data,
        base / "logs",
        env={"PRISM_VRPC_BACKEND": backend},
        extra_args=["--vrpc", str(sockdir / "vrpc.sock")],
    )
    try:
        with server:
            yield server
            assert f"({backend} ring backend)" in server.stderr()
    finally:
        shutil.rmtree(ring_dir(data), ignore_errors=True)
    shutil.rmtree(sockdir, ignore_errors=True)
    fsck = prism_cli(data, "fsck", "--json")
    assert '"clean": true' in fsck.stdout, fsck.stdout


def guest_ring(srv: PrismProcess, vm: str = "vm") -> dict[str, object]:
    out = srv.cli("vm", "vrpc-guest", vm, "--vrpc", str(socket_of(srv.ready_line)), "--json")
    return dict(json.loads(out.stdout))


def run_client(mem: str, *args: str, check: bool = True) -> dict[str, list[str]]:
    proc = subprocess.run(
        [str(guest_client()), "--mem", mem, *args], capture_output=True, text=True, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return results(proc.stdout)


def test_vrpc_guest_prints_qemu_args_and_keeps_one_channel_per_vm(srv: PrismProcess) -> None:
    first = guest_ring(srv, "other")
    again = guest_ring(srv, "other")
    mem = first["mem_path"]
    assert isinstance(mem, str)
    assert first["qemu_args"] == [
        "-object",
        f"memory-backend-file,id=prism-vrpc-other,size={first['size']},share=on,mem-path={mem}",
        "-device",
        "ivshmem-plain,memdev=prism-vrpc-other",
    ]
    size = first["size"]
    assert isinstance(size, int) and size & (size - 1) == 0, "a BAR is a power of 2"
    assert os.stat(mem).st_size == size
    assert again == {**first, "created": False}
    text = srv.cli("vm", "vrpc-guest", "other", "--vrpc", str(socket_of(srv.ready_line)))
    assert text.stdout.split() == first["qemu_args"]
    # a file on tmpfs that only the server's user (and root) may open, named by the VM's id
    assert Path(mem).parent == ring_dir(srv.data) and re.fullmatch(r"vm-\d+\.ring", Path(mem).name)
    assert Path(mem).parent.parent == Path("/dev/shm")
    st, dirst = os.stat(mem), os.stat(Path(mem).parent)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(dirst.st_mode) == 0o700 and dirst.st_uid == os.geteuid()


def test_guest_client_mounts_writes_reads_lists_over_the_ring(srv: PrismProcess) -> None:
    ring = guest_ring(srv)
    mem = str(ring["mem_path"])
    r = run_client(mem, "run", "/vm", "from-guest.bin")
    assert r["mnt"] == ["0"] and r["null"] == ["ok"] and r["root_type"] == ["2"]
    assert r["channel"] == [str(ring["channel"])]
    want = fnv1a(pattern(GUEST_BYTES))
    assert r["written"] == [str(GUEST_BYTES)] and r["write_sum"] == [want]
    assert r["read"] == [str(GUEST_BYTES)] and r["read_sum"] == [want]
    assert "from-guest.bin" in r["entry"]
    # the same data through a normal TCP NFS client of the same VM
    with srv.nfs_client() as nfs:
        root = srv.mount("/vm")
        fh = nfs.lookup(root, b"from-guest.bin").object
        data = nfs.read(fh, 0, GUEST_BYTES + 100).data
    assert data == pattern(GUEST_BYTES)
    # a second run on the same ring (as after a guest reboot) picks up where the last ended
    assert run_client(mem, "run", "/vm", "again.bin")["read_sum"] == [want]


def test_guest_cannot_reach_another_vm(srv: PrismProcess) -> None:
    mem = str(guest_ring(srv, "vm")["mem_path"])
    assert run_client(mem, "mnt", "/other")["mnt"] == [str(int(MountStat3.MNT3ERR_ACCES))]
    assert run_client(mem, "mnt", "/vm")["mnt"] == ["0"]


def _ask(path: Path, vm: str, request: GuestRequest | None = None) -> GuestRing | Refused:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.send(encode_guest_request(request or GuestRequest(vm)))
        return decode_guest_reply(sock.recv(MAX_MESSAGE))


def test_only_the_operator_makes_guest_channels(srv: PrismProcess) -> None:
    path = socket_of(srv.ready_line)
    answer = as_user(lambda: _ask(path, "vm"), NOBODY, NOBODY)
    assert isinstance(answer, Refused) and answer.status == RefuseStatus.ACCES
    assert "root or as the server's user" in answer.message
    answer = _ask(path, "nosuchvm")
    assert isinstance(answer, Refused) and answer.status == RefuseStatus.NOENT
    out = srv.cli("vm", "vrpc-guest", "nosuchvm", "--vrpc", str(path), check=False)
    assert out.returncode == 2 and "no VM named 'nosuchvm'" in out.stderr
    out = srv.cli("vm", "vrpc-guest", "vm", "--vrpc", str(path) + ".nope", check=False)
    assert out.returncode == 2 and "is `prism serve` running with VRPC?" in out.stderr
    with pytest.raises(XdrError):
        decode_guest_reply(b"PVRO" + bytes(60))


def _map(ring: dict[str, object]) -> mmap.mmap:
    fd = os.open(str(ring["mem_path"]), os.O_RDWR)
    try:
        return mmap.mmap(fd, int(str(ring["size"])))
    finally:
        os.close(fd)


def _wait_for(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _soak(mem: str, export: str, name: str, seconds: int) -> subprocess.Popen[str]:
    """The guest client writing and reading back over `mem` for `seconds`, under way."""
    proc = subprocess.Popen(
        [str(guest_client()), "--mem", mem, "soak", export, name, str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("R soaking=1"):
            return proc
    proc.wait()
    raise AssertionError(f"the soak never started (exit {proc.returncode})")


def test_guest_channel_follows_rename_and_ends_with_its_vm(srv: PrismProcess) -> None:
    """A guest channel is bound to its VM's id: a rename keeps it working (logged under the
    new name); removing the VM closes it (the guest's next call fails cleanly) and frees it
    (its memory, poller and slot of the channel limit)."""
    srv.cli("vm", "create", "doomed")
    ring = guest_ring(srv, "doomed")
    assert run_client(str(ring["mem_path"]), "mnt", "/doomed")["mnt"] == ["0"]

    def channels() -> int:
        figures = read_stats(srv.data)
        return -1 if figures is None else int(figures["channels"])

    m = _map(ring)
    held = os.open(str(ring["mem_path"]), os.O_RDWR)  # (reached after the file is removed)
    with m:
        srv.cli("vm", "rename", "doomed", "renamed")
        r = run_client(str(ring["mem_path"]), "mnt", "/renamed")
        assert r["mnt"] == ["0"] and r["channel"] == [str(ring["channel"])]
        _wait_for("the rename logged", lambda: "its VM is now named renamed" in srv.stderr())
        time.sleep(2 * STATS_SECONDS)  # the figures published since the channel was made
        before = channels()
        assert before >= 1
        assert not _U32.unpack_from(m, SERVER_FLAGS)[0] & abi.SERVER_CLOSED
        soak = _soak(str(ring["mem_path"]), "/renamed", "soak.bin", 60)  # mid-work when removed
        srv.cli("vm", "rm", "renamed")
        _wait_for(
            "the removed VM's channel closed",
            lambda: bool(_U32.unpack_from(m, SERVER_FLAGS)[0] & abi.SERVER_CLOSED),
        )
        _wait_for("the channel freed", lambda: channels() == before - 1)
        assert _U32.unpack_from(m, SERVER_FLAGS)[0] & abi.SERVER_GONE  # no reset will come
        # at once, whichever it met first: STALE (a call that raced the removal) or GONE (it
        # does not wait for a reset that will never come)
        out, _ = soak.communicate(timeout=10)
        assert soak.returncode == 1 and "R error=" in out, out
        late = subprocess.run(
            [str(guest_client()), "--mem", f"/proc/{os.getpid()}/fd/{held}", "mnt", "/renamed"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert late.returncode == 1 and "closed the channel for good" in late.stdout, late
    os.close(held)
    out = run_client(str(ring["mem_path"]), "mnt", "/renamed", check=False)
    assert out.get("error") and out.get("mnt") is None, out
    assert not Path(str(ring["mem_path"])).exists()  # its memory goes with the last mapping
    assert f"vrpc guest channel {ring['channel']} (vm renamed" in srv.stderr()
    assert "its VM was removed; channel closed" in srv.stderr()
    gone = srv.cli(
        "vm", "vrpc-guest", "renamed", "--vrpc", str(socket_of(srv.ready_line)), check=False
    )
    assert gone.returncode == 2 and "no VM named 'renamed'" in gone.stderr


# -- a hostile guest: scribbling on the shared memory ----------------------------------------


def _u32(at: int, value: int) -> Callable[[mmap.mmap], None]:
    def scribble(m: mmap.mmap) -> None:
        m[at : at + 4] = _U32.pack(value)

    return scribble


def _sqe(slot: int, length: int, flags: int) -> Callable[[mmap.mmap], None]:
    """Publish one SQE (slot, len, flags) at the client's tail, as a guest would."""

    def scribble(m: mmap.mmap) -> None:
        tail = _U32.unpack_from(m, SQ_TAIL)[0]
        entries = _U32.unpack_from(m, abi.RING_HEADER["entries"][0])[0]
        at = abi.SQ_OFFSET + abi.ENTRY_SIZE * (tail & (entries - 1))
        m[at : at + 16] = struct.pack("=4I", slot, length, flags, 0)
        m[SQ_TAIL : SQ_TAIL + 4] = _U32.pack(tail + 1)

    return scribble


def _garbage_record(m: mmap.mmap) -> None:
    rng = random.Random(7)
    start = abi.SLOT_OFFSET
    m[start : start + 200] = bytes(rng.randrange(256) for _ in range(200))
    _sqe(0, 200, 0)(m)


def _random_header(m: mmap.mmap) -> None:
    rng = random.Random(11)
    m[0 : abi.SLOT_OFFSET] = bytes(rng.randrange(256) for _ in range(abi.SLOT_OFFSET))


SCRIBBLES = {
    "sq_tail_overrun": _u32(SQ_TAIL, 0x7FFF0000),
    "sqe_slot_out_of_range": _sqe(99, 100, 0),
    "sqe_len_beyond_slot": _sqe(0, abi.SLOT_SIZE + 1, 0),
    "sqe_unknown_flags": _sqe(0, 100, 0x40),
    "garbage_record": _garbage_record,
    "random_header_and_queues": _random_header,
}


@pytest.mark.parametrize("scribble", SCRIBBLES)
def test_scribbled_guest_ring_closes_only_that_channel(srv: PrismProcess, scribble: str) -> None:
    """The server reads the shared memory of a guest channel as hostile, like any channel's:
    a guest that breaks the ring gets its channel closed; TCP and other channels go on, and
    the operator's command makes a new channel."""
    ring = guest_ring(srv)
    mem = str(ring["mem_path"])
    assert run_client(mem, "mnt", "/vm")["mnt"] == ["0"]
    other = str(guest_ring(srv, "other")["mem_path"])
    fd = os.open(mem, os.O_RDWR)
    try:
        m = mmap.mmap(fd, int(str(ring["size"])))
    finally:
        os.close(fd)
    with m:
        SCRIBBLES[scribble](m)
        deadline = time.monotonic() + 5
        while not _U32.unpack_from(m, SERVER_FLAGS)[0] & abi.SERVER_CLOSED:
            assert time.monotonic() < deadline, "the server never closed the scribbled channel"
            time.sleep(0.01)
    assert srv.running
    with srv.nfs_client() as nfs:  # TCP goes on
        assert nfs.getattr(srv.mount("/vm")).ok
    assert run_client(other, "mnt", "/other")["mnt"] == ["0"]  # so does the other VM's channel
    fresh = guest_ring(srv)
    assert fresh["created"] is True and fresh["channel"] != ring["channel"]
    assert run_client(str(fresh["mem_path"]), "mnt", "/vm")["mnt"] == ["0"]
    assert "protocol error" in srv.stderr()


def test_server_stop_closes_guest_channels(tmp_path: Path) -> None:
    """A guest keeps its mapping when the server goes: it must see the channel closed
    (SERVER_CLOSED) rather than wait for replies forever."""
    with running_server(tmp_path) as server:
        ring = guest_ring(server)
        fd = os.open(str(ring["mem_path"]), os.O_RDWR)
        try:
            m = mmap.mmap(fd, int(str(ring["size"])))
        finally:
            os.close(fd)
        with m:
            assert not _U32.unpack_from(m, SERVER_FLAGS)[0] & abi.SERVER_CLOSED
            server.stop()
            assert _U32.unpack_from(m, SERVER_FLAGS)[0] & abi.SERVER_CLOSED
        shutil.rmtree(ring_dir(server.data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_guest_rides_through_server_restarts(tmp_path: Path, backend: str) -> None:
    """The ring is a file that outlives the server: after kill -9 and after a clean restart
    the server adopts it again (a reset the client sees: new boot and channel ids), the
    client resends what it had in flight and carries on, and every byte it wrote is there,
    through TCP too. A VM removed while the server was down loses its ring at the start; a
    ring file that is not what the server made (here a symlink) is replaced, never followed."""
    data = new_data_dir(tmp_path / "data", ["vm", "gone", "odd"])
    server = PrismProcess(data, tmp_path / "logs", env={"PRISM_VRPC_BACKEND": backend})
    rings = ring_dir(data)
    try:
        with server:
            ring = guest_ring(server)
            mem = str(ring["mem_path"])
            gone = Path(str(guest_ring(server, "gone")["mem_path"]))
            odd = Path(str(guest_ring(server, "odd")["mem_path"]))
            soak = _soak(mem, "/vm", "soak.bin", 8)
            time.sleep(1)
            server.kill()
            server.cli("vm", "rm", "gone")
            odd.unlink()
            bait = tmp_path / "bait"
            bait.write_bytes(b"not a ring")
            odd.symlink_to(bait)
            time.sleep(0.5)  # the client waits, its call in flight or its next one
            server.start()
            time.sleep(2)
            server.restart()  # a clean one: SERVER_CLOSED, then the reset
            out, _ = soak.communicate(timeout=60)
            assert soak.returncode == 0, out
            r = results(out)
            assert len(r["reset"]) >= 2, out  # it saw both restarts
            rounds = int(r["soak_rounds"][0])
            assert rounds > 0
            want = pattern(rounds * 4096)
            assert r["soak_sum"] == [fnv1a(want)]
            with server.nfs_client() as nfs:
                fh = nfs.lookup(server.mount("/vm"), b"soak.bin").object
                assert read_all(nfs, fh) == want
            again = guest_ring(server)
            assert again["mem_path"] == mem and again["created"] is False
            assert run_client(mem, "run", "/vm", "after.bin")["read_sum"] == [
                fnv1a(pattern(GUEST_BYTES))
            ]
            assert not gone.exists() and "which no longer exists" in server.all_stderr()
            assert not odd.is_symlink() and bait.read_bytes() == b"not a ring"
            assert "is not a guest ring of this server" in server.all_stderr()
            assert "adopted from the last run (reset)" in server.stderr()
    finally:
        shutil.rmtree(rings, ignore_errors=True)
    fsck = prism_cli(data, "fsck", "--json")
    assert '"clean": true' in fsck.stdout, fsck.stdout


def _opens(mem: str) -> bool:
    try:
        os.close(os.open(mem, os.O_RDWR))
    except PermissionError:
        return False
    return True


def test_owner_gives_the_ring_to_qemus_user_across_restarts(tmp_path: Path) -> None:
    """`--owner USER[:GROUP]` (root only) gives the ring's file to the user QEMU runs as, as
    libvirt's does: that user may open it, others may not; the choice is recorded, so the file
    the server re-adopts after kill -9 keeps it; `--owner none` gives it back."""
    data = new_data_dir(tmp_path / "data", ["vm"])
    sockdir = reachable_dir()
    server = PrismProcess(data, tmp_path / "logs", extra_args=["--vrpc", str(sockdir / "v.sock")])

    def guest(*extra: str) -> dict[str, object]:
        out = server.cli("vm", "vrpc-guest", "vm", *extra, "--vrpc", str(path), "--json")
        return dict(json.loads(out.stdout))

    try:
        with server:
            path = socket_of(server.ready_line)
            asked = GuestRequest("vm", owner=GuestOwner.SET, uid=NOBODY, gid=NOBODY)
            answer = as_user(lambda: _ask(path, "vm", asked), NOBODY, NOBODY)
            assert isinstance(answer, Refused) and answer.status == RefuseStatus.ACCES
            ring = guest("--owner", "nobody")
            mem = str(ring["mem_path"])
            assert ring["owner"] == {"uid": NOBODY, "gid": NOBODY}  # nobody's own group
            st = os.stat(mem)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
            assert stat.S_IMODE(os.stat(Path(mem).parent).st_mode) == 0o711
            assert as_user(lambda: _opens(mem), NOBODY, NOBODY) is True
            assert as_user(lambda: _opens(mem), 4321, 4321) is False
            with pytest.raises(PermissionError):  # others traverse the directory, never list it
                as_user(lambda: os.listdir(Path(mem).parent), NOBODY, NOBODY)
            record = json.loads((data / "vrpc-guests.json").read_text())
            assert list(record["owners"].values()) == [[NOBODY, NOBODY]]

            server.restart(crash=True)
            path = socket_of(server.ready_line)
            assert "adopted from the last run (reset)" in server.stderr()
            again = guest()  # no --owner: the recorded one stays
            assert again["mem_path"] == mem and again["created"] is False
            assert again["owner"] == {"uid": NOBODY, "gid": NOBODY}
            assert run_client(mem, "mnt", "/vm")["mnt"] == ["0"]

            back = guest("--owner", "none")
            assert back["owner"] == {"uid": os.geteuid(), "gid": os.getegid()}
            assert as_user(lambda: _opens(mem), NOBODY, NOBODY) is False
            assert stat.S_IMODE(os.stat(Path(mem).parent).st_mode) == 0o700
            unknown = server.cli("vm", "vrpc-guest", "vm", "--owner", "no-such-user", check=False)
            assert unknown.returncode == 2 and "no user named 'no-such-user'" in unknown.stderr
    finally:
        shutil.rmtree(ring_dir(data), ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
