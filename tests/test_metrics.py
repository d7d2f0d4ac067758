"""`prism serve --metrics ADDR:PORT`: Prometheus metrics through prometheus_client.

The server is started with `--metrics 127.0.0.1:0` and the port it bound is read from its
ready line (`... metrics :PORT`). Every scrape is parsed with `prometheus_client.parser`
(and checked: no series repeats, histogram buckets are cumulative and end in +Inf equal to
their count). After NFS calls through our client, GET /metrics shows per-VM logical bytes,
files, quota, calls by procedure and bytes read and written; the store's logical and stored
bytes, dedup ratio and chunk count; per-procedure call counts, errors by status and latency
histograms whose counts grew by exactly the calls made; the journal's durable points; and
the process metrics. Every metric exposed is documented in the README's table. Any other
path is 404; a scrape the event loop does not answer in time is 503.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from prism.metrics import FAMILIES, MetricsServer
from prism.nfs.client import MountClient
from prism.nfs.const import NFS_PROGRAM, NFS_V3, MountStat3, Nfs3Proc, NfsStat3, StableHow
from prism.nfs.wire import Sattr3
from prism.nlm.client import NlmClient
from prism.nlm.types import NlmStat
from rpc.message import AcceptedReply, AcceptStat, decode_reply, encode_call
from rpc.record import RecordReader, frame
from tests.op_helpers import PrismServe, nfs_put, prism

CHUNK = 128 * 1024
CONTENT = os.urandom(2 * CHUNK)  # two distinct whole chunks, the same in both VMs
README = Path(__file__).resolve().parent.parent / "README.md"

METRICS_PORT = re.compile(r"^prism: ready: .* metrics :(?P<port>\d+)\s*$")

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def check_histograms(families: list[Any]) -> None:
    """Each histogram series: buckets cumulative, the last +Inf, equal to its _count."""
    for family in (f for f in families if f.type == "histogram"):
        series: dict[frozenset[tuple[str, str]], list[tuple[str, float]]] = {}
        counts = {}
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "le")
            if s.name.endswith("_bucket"):
                series.setdefault(labels, []).append((s.labels["le"], s.value))
            elif s.name.endswith("_count"):
                counts[labels] = s.value
        for labels, buckets in series.items():
            values = [v for _, v in buckets]
            assert values == sorted(values), (family.name, labels, buckets)
            assert buckets[-1][0] == "+Inf" and buckets[-1][1] == counts[labels]


class Metrics:
    def __init__(self, server: PrismServe) -> None:
        ports = [m["port"] for line in server.lines if (m := METRICS_PORT.match(line))]
        assert ports, "the ready line names no metrics port:\n" + server.log()
        self.port = int(ports[0])
        assert self.port != 0

    def get(self, path: str, accept: str | None = None) -> tuple[int, str, str]:
        """(status, content type, body) of GET `path`."""
        url = f"http://127.0.0.1:{self.port}{path}"
        headers = {"Accept": accept} if accept else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    def families(self) -> list[Any]:
        """GET /metrics in the text format, parsed by prometheus_client."""
        status, ctype, body = self.get("/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
        families = list(text_string_to_metric_families(body))
        check_histograms(families)
        return families

    def scrape(self) -> Series:
        """Every sample of a scrape by (sample name, labels); no series repeats."""
        out: Series = {}
        for family in self.families():
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in out, f"series repeated: {key}"
                out[key] = s.value
        return out


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def nfs(series: Series, name: str, proc: str) -> float:
    return value(series, name, program="nfs", version="3", proc=proc)


def errors(series: Series) -> dict[tuple[str, str, str], float]:
    """prism_rpc_errors_total: (program, procedure, status) -> count."""
    out = {}
    for (name, labels), count in series.items():
        if name == "prism_rpc_errors_total":
            d = dict(labels)
            out[d["program"], d["proc"], d["status"]] = count
    return out


def grown(before: Series, after: Series) -> dict[tuple[str, str, str], float]:
    old = errors(before)
    return {k: v - old.get(k, 0) for k, v in errors(after).items() if v != old.get(k, 0)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrismServe, Metrics]]:
    data = tmp_path_factory.mktemp("metrics") / "data"
    prism(data, "vm", "create", "alpha", "--quota", "10M")
    prism(data, "vm", "create", "beta")
    with PrismServe(data, "--metrics", "127.0.0.1:0") as server:
        yield server, Metrics(server)


def test_store_and_vm_figures(served: tuple[PrismServe, Metrics]) -> None:
    server, metrics = served
    for vm in ("alpha", "beta"):
        c, root = server.mount("/" + vm)
        with c:
            nfs_put(c, root, "blob", CONTENT)
            assert c.mkdir(root, "dir", Sattr3(mode=0o755)).ok
            if vm == "beta":
                nfs_put(c, root, "extra", b"beta only\n")
    s = metrics.scrape()
    assert value(s, "prism_vm_logical_bytes", vm="alpha") == len(CONTENT)
    assert value(s, "prism_vm_logical_bytes", vm="beta") == len(CONTENT) + 10
    assert value(s, "prism_vm_files", vm="alpha") == 3  # root, blob, dir
    assert value(s, "prism_vm_files", vm="beta") == 4
    assert value(s, "prism_vm_quota_bytes", vm="alpha") == 10 << 20
    assert ("prism_vm_quota_bytes", frozenset({("vm", "beta")})) not in s  # no quota
    logical = 2 * len(CONTENT) + 10
    stored = len(CONTENT) + 10  # the blob is stored once
    assert value(s, "prism_store_logical_bytes") == logical
    assert value(s, "prism_store_stored_bytes") == stored
    assert value(s, "prism_store_chunks") == 3
    assert value(s, "prism_store_dedup_ratio") == pytest.approx(logical / stored, abs=1e-3)
    # the blob was written twice, independently: dedup, not sharing by a clone
    assert value(s, "prism_store_dedup_bytes") == len(CONTENT)
    assert value(s, "prism_store_clone_shared_bytes") == 0

    # the figures follow the store, including changes made by the operator commands
    prism(server.data, "vm", "set", "beta", "--quota", "1G")
    prism(server.data, "vm", "create", "gamma")
    s = metrics.scrape()
    assert value(s, "prism_vm_quota_bytes", vm="beta") == 1 << 30
    assert value(s, "prism_vm_files", vm="gamma") == 1
    assert value(s, "prism_vm_logical_bytes", vm="gamma") == 0


def test_procedure_counts_and_latency_grow_with_calls(served: tuple[PrismServe, Metrics]) -> None:
    """Calls, per-procedure latency histograms and the calling VM's figures grow by exactly
    the calls made: the histogram's count equals the call count, for every procedure."""
    server, metrics = served
    c, root = server.mount("/alpha")
    with c:
        fh = nfs_put(c, root, "counted", b"x" * 1000)
        before = metrics.scrape()
        for _ in range(37):
            assert c.getattr(fh).ok
        for _ in range(5):
            assert c.lookup(root, "no-such-name").status == NfsStat3.NFS3ERR_NOENT
        for _ in range(3):
            assert len(c.read(fh, 0, 100).data) == 100
        assert c.write(fh, 0, b"y" * 300).ok
        after = metrics.scrape()
    procs = ("GETATTR", "LOOKUP", "READ", "WRITE", "CREATE", "REMOVE")
    want = {"GETATTR": 37, "LOOKUP": 5, "READ": 3, "WRITE": 1, "CREATE": 0, "REMOVE": 0}

    def grew(name: str, **labels: str) -> dict[str, float]:
        return {
            p: value(after, name, **labels, proc=p) - value(before, name, **labels, proc=p)
            for p in procs
        }

    nfs3 = {"program": "nfs", "version": "3"}
    assert grew("prism_rpc_calls_total", **nfs3) == want
    assert grew("prism_rpc_latency_seconds_count", **nfs3) == want
    assert grew("prism_rpc_latency_seconds_bucket", **nfs3, le="+Inf") == want
    assert grew("prism_vm_calls_total", vm="alpha") == want
    for proc in ("GETATTR", "LOOKUP", "READ", "WRITE"):
        assert nfs(after, "prism_rpc_latency_seconds_sum", proc) > nfs(
            before, "prism_rpc_latency_seconds_sum", proc
        )
    # every series: the histogram counts each call once, as the call counter does
    for (name, labels), calls in after.items():
        if name == "prism_rpc_calls_total":
            assert after["prism_rpc_latency_seconds_count", labels] == calls, labels
    assert (
        value(after, "prism_vm_read_bytes_total", vm="alpha")
        - value(before, "prism_vm_read_bytes_total", vm="alpha")
        == 300
    )
    assert (
        value(after, "prism_vm_written_bytes_total", vm="alpha")
        - value(before, "prism_vm_written_bytes_total", vm="alpha")
        == 300
    )
    for other in ("beta", "gamma"):  # the other VMs saw none of it
        for name in ("prism_vm_read_bytes_total", "prism_vm_written_bytes_total"):
            assert value(after, name, vm=other) == value(before, name, vm=other)
        assert grew("prism_vm_calls_total", vm=other) == dict.fromkeys(procs, 0)
    # MOUNT calls are counted under their own program
    assert value(after, "prism_rpc_calls_total", program="mount", version="3", proc="MNT") >= 1


def test_per_vm_bytes_are_what_read_returned_and_write_accepted(
    served: tuple[PrismServe, Metrics],
) -> None:
    """Bytes read and written count what READ returned and WRITE accepted (a READ past
    EOF returns less than asked), per VM, and a snapshot's reads count for its VM."""
    server, metrics = served
    before = metrics.scrape()
    c, root = server.mount("/beta")
    with c:
        fh = nfs_put(c, root, "sized", b"z" * 5000)
        assert len(c.read(fh, 4000, 4096).data) == 1000  # short: EOF
        assert c.read(fh, 9000, 4096).data == b""
    prism(server.data, "snapshot", "create", "beta", "then")
    c, snap = server.mount("/beta@then")
    with c:
        assert len(c.read(c.lookup(snap, "sized").object, 0, 4096).data) == 4096
    after = metrics.scrape()

    def grew(name: str) -> float:
        return value(after, name, vm="beta") - value(before, name, vm="beta")

    assert grew("prism_vm_written_bytes_total") == 5000
    assert grew("prism_vm_read_bytes_total") == 1000 + 4096
    assert grow_calls(before, after, "beta", "READ") == 3


def grow_calls(before: Series, after: Series, vm: str, proc: str) -> float:
    return value(after, "prism_vm_calls_total", vm=vm, proc=proc) - value(
        before, "prism_vm_calls_total", vm=vm, proc=proc
    )


def test_journal_flushes_and_checkpoints_are_histograms(
    served: tuple[PrismServe, Metrics],
) -> None:
    """A durable change waits for a durable point (the journal's fdatasync), counted in
    prism_journal_flush_seconds; the batch is checkpointed once calls stop."""
    server, metrics = served
    before = metrics.scrape()
    c, root = server.mount("/alpha")
    with c:
        for i in range(3):
            assert c.mkdir(root, f"durable{i}", Sattr3(mode=0o755)).ok
    deadline = time.monotonic() + 10
    while True:
        after = metrics.scrape()
        if (
            value(after, "prism_store_checkpoint_seconds_count")
            > value(before, "prism_store_checkpoint_seconds_count")
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    flushes = value(after, "prism_journal_flush_seconds_count") - value(
        before, "prism_journal_flush_seconds_count"
    )
    assert 1 <= flushes <= 3  # group commit: at most one per call here
    assert value(after, "prism_journal_flush_seconds_sum") > value(
        before, "prism_journal_flush_seconds_sum"
    )
    assert value(after, "prism_store_checkpoint_seconds_count") > value(
        before, "prism_store_checkpoint_seconds_count"
    )


def test_other_requests_get_404_and_do_not_disturb_it(served: tuple[PrismServe, Metrics]) -> None:
    _, metrics = served
    for path in ("/", "/metricsx", "/metrics/x", "/favicon.ico"):
        status, _, body = metrics.get(path)
        assert status == 404, path
        assert "/metrics" in body
    assert metrics.get("/metrics?name[]=prism_vm_files")[0] == 200
    # a client that connects and says nothing, or sends garbage, does not stop the server
    with socket.create_connection(("127.0.0.1", metrics.port), timeout=5):
        pass
    with socket.create_connection(("127.0.0.1", metrics.port), timeout=10) as sock:
        sock.sendall(b"\xff\xfe garbage\r\n\r\n")
        sock.recv(4096)
    assert metrics.scrape()


NLM_PORT = re.compile(r" nlm (?P<port>\d+) ")


def test_every_non_ok_status_is_an_error_by_procedure_and_status(
    served: tuple[PrismServe, Metrics],
) -> None:
    """NFS, MOUNT and NLM replies that carry a failure status are RPC SUCCESS replies, and
    each is counted in prism_rpc_errors_total under its procedure and status; OK replies
    and procedures without a status are not."""
    server, metrics = served
    prism(server.data, "vm", "create", "tight", "--quota", "512K")
    prism(server.data, "vm", "create", "fenced", "--client", "10.99.0.1/32")
    prism(server.data, "snapshot", "create", "alpha", "frozen")
    before = metrics.scrape()
    c, root = server.mount("/alpha")
    with c:
        assert c.lookup(root, "absent").status == NfsStat3.NFS3ERR_NOENT
        assert c.lookup(root, "absent").status == NfsStat3.NFS3ERR_NOENT
        gone = nfs_put(c, root, "gone", b"soon removed")
        assert c.remove(root, "gone").ok
        assert c.getattr(gone).status == NfsStat3.NFS3ERR_STALE
        mine = nfs_put(c, root, "locked", b"x" * 10)
        assert c.getattr(mine).ok and c.lookup(root, "locked").ok
    c, snap_root = server.mount("/alpha@frozen")
    with c:
        made = c.create(snap_root, "new", Sattr3(mode=0o644))
        assert made.status == NfsStat3.NFS3ERR_ROFS
    c, tight = server.mount("/tight")
    with c:
        f = c.create(tight, "big", Sattr3(mode=0o644))
        assert f.ok and f.obj is not None
        wrote = c.write(f.obj, 0, bytes(1 << 20), StableHow.FILE_SYNC)
        assert wrote.status == NfsStat3.NFS3ERR_DQUOT
    with MountClient("127.0.0.1", server.mount_port) as m:
        assert m.mnt_raw("/fenced").status == MountStat3.MNT3ERR_ACCES
        assert m.mnt_raw("/no-such-vm").status == MountStat3.MNT3ERR_NOENT
    nlm_port = next(int(m["port"]) for line in server.lines if (m := NLM_PORT.search(line)))
    with NlmClient("127.0.0.1", nlm_port) as one, NlmClient("127.0.0.1", nlm_port) as two:
        held = one.alock(mine.data, svid=1)
        assert one.lock(held).stat == NlmStat.GRANTED
        assert two.lock(two.alock(mine.data, svid=2)).stat == NlmStat.DENIED
        assert one.unlock(held).stat == NlmStat.GRANTED
    assert grown(before, metrics.scrape()) == {
        ("nfs", "LOOKUP", "NFS3ERR_NOENT"): 2,
        ("nfs", "GETATTR", "NFS3ERR_STALE"): 1,
        ("nfs", "CREATE", "NFS3ERR_ROFS"): 1,
        ("nfs", "WRITE", "NFS3ERR_DQUOT"): 1,
        ("mount", "MNT", "MNT3ERR_ACCES"): 1,
        ("mount", "MNT", "MNT3ERR_NOENT"): 1,
        ("nlm", "LOCK", "DENIED"): 1,
    }


def test_rpc_level_failures_are_errors_by_their_outcome(served: tuple[PrismServe, Metrics]) -> None:
    server, metrics = served
    before = metrics.scrape()
    with socket.create_connection(("127.0.0.1", server.nfs_port), timeout=10) as sock:
        # GETATTR whose argument (an nfs_fh3) is cut short: GARBAGE_ARGS
        body = encode_call(7, NFS_PROGRAM, NFS_V3, Nfs3Proc.GETATTR, b"\0\0\0\x40")
        sock.sendall(frame(body))
        reply = RecordReader(1 << 20)
        while not (records := reply.feed(sock.recv(65536))):
            pass
        assert decode_reply(records[0]) == AcceptedReply(7, AcceptStat.GARBAGE_ARGS)
    assert grown(before, metrics.scrape()) == {("nfs", "GETATTR", "GARBAGE_ARGS"): 1}


def test_openmetrics_on_request_and_process_metrics(served: tuple[PrismServe, Metrics]) -> None:
    """The scraper's Accept header chooses the format (prometheus_client's negotiation);
    the process metrics come with Prism's."""
    server, metrics = served
    status, ctype, body = metrics.get(
        "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200 and ctype.startswith("application/openmetrics-text"), ctype
    assert body.endswith("# EOF\n")
    names = {f.name: f for f in openmetrics_families(body)}
    assert names["prism_rpc_calls"].type == "counter"
    assert names["prism_rpc_latency_seconds"].type == "histogram"
    s = metrics.scrape()
    assert value(s, "process_cpu_seconds_total") > 0
    assert value(s, "process_resident_memory_bytes") > 1 << 20
    assert value(s, "process_open_fds") > 3
    assert server.proc is not None
    assert abs(value(s, "process_start_time_seconds") - time.time()) < 3600


TABLE_ROW = re.compile(r"^\| `(?P<name>[a-z_:]+)` \| (?P<kind>counter|gauge|histogram) \|")


def documented() -> dict[str, str]:
    """The README's metrics table: name -> type."""
    return {
        m["name"]: m["kind"]
        for line in README.read_text().splitlines()
        if (m := TABLE_ROW.match(line))
    }


def exposed_name(family: Any) -> str:
    """A family's name as the README writes it (counters with their _total)."""
    return f"{family.name}_total" if family.type == "counter" else family.name


def test_every_metric_is_documented(served: tuple[PrismServe, Metrics]) -> None:
    """Every family a running server exposes, and every one Prism declares, is in the
    README's table with its type; the table names nothing that does not exist."""
    _, metrics = served
    docs = documented()
    exposed = {exposed_name(f): f.type for f in metrics.families()}
    declared = {f.name: f.kind for f in FAMILIES}
    assert {n: t for n, t in exposed.items() if n not in docs} == {}
    assert {n: t for n, t in declared.items() if docs.get(n) != t} == {}
    assert {n: t for n, t in exposed.items() if docs[n] != t} == {}
    assert set(docs) - set(exposed) - set(declared) == set()


def test_a_scrape_the_event_loop_does_not_answer_is_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The figures are read on the event loop; one that is busy (here: not running) gets a
    503 after SCRAPE_TIMEOUT, the endpoint stays up, and other paths still get 404."""
    monkeypatch.setattr("prism.metrics.SCRAPE_TIMEOUT", 0.2)
    loop = asyncio.new_event_loop()
    try:
        server = MetricsServer("127.0.0.1:0", None, loop)  # type: ignore[arg-type]
        try:
            url = f"http://127.0.0.1:{server.port}"
            for _ in range(2):
                with pytest.raises(urllib.error.HTTPError) as info:
                    urllib.request.urlopen(url + "/metrics", timeout=10)
                assert info.value.code == 503
                assert "did not answer within 0.2 s" in info.value.read().decode()
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url + "/", timeout=10)
            assert info.value.code == 404
        finally:
            loop.run_until_complete(server.close())
    finally:
        loop.close()
