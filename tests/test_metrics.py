"""`prism serve --metrics ADDR:PORT`: the Prometheus text format over HTTP.

The server is started with `--metrics 127.0.0.1:0` and the port it bound is read from its
ready line (`... metrics :PORT`). After NFS calls through our client, GET /metrics shows
per-VM logical bytes, files and quota, the store's logical and stored bytes, dedup ratio
and chunk count, and per-procedure call counts and latency sums that grew by exactly the
calls made; any other path is 404.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from prism.nfs.const import NfsStat3
from prism.nfs.wire import Sattr3
from tests.op_helpers import PrismServe, nfs_put, prism

CHUNK = 128 * 1024
CONTENT = os.urandom(2 * CHUNK)  # two distinct whole chunks, the same in both VMs

METRICS_PORT = re.compile(r"^prism: ready: .* metrics :(?P<port>\d+)\s*$")
SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Metrics:
    def __init__(self, server: PrismServe) -> None:
        ports = [m["port"] for line in server.lines if (m := METRICS_PORT.match(line))]
        assert ports, "the ready line names no metrics port:\n" + server.log()
        self.port = int(ports[0])
        assert self.port != 0

    def get(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) of GET `path`."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    def scrape(self) -> Series:
        """GET /metrics, checked line by line against the text format: every sample belongs
        to a family declared by # HELP and # TYPE before it, and no series repeats."""
        status, ctype, body = self.get("/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
        assert body.endswith("\n")
        types: dict[str, str] = {}
        helped: set[str] = set()
        out: Series = {}
        for line in body.splitlines():
            if line.startswith("# HELP "):
                helped.add(line.split()[2])
                continue
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                assert kind in ("counter", "gauge"), line
                assert name not in types, f"family {name} declared twice"
                types[name] = kind
                continue
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name = m["name"]
            assert name in types and name in helped, f"{name} has no # HELP/# TYPE"
            labels = m["labels"] or ""
            pairs = LABEL.findall(labels)
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels, line
            key = (name, frozenset(pairs))
            assert key not in out, f"series repeated: {line}"
            out[key] = float(m["value"])
        return out


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def nfs(series: Series, name: str, proc: str) -> float:
    return value(series, name, program="nfs", version="3", proc=proc)


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

    # the figures follow the store, including changes made by the operator commands
    prism(server.data, "vm", "set", "beta", "--quota", "1G")
    prism(server.data, "vm", "create", "gamma")
    s = metrics.scrape()
    assert value(s, "prism_vm_quota_bytes", vm="beta") == 1 << 30
    assert value(s, "prism_vm_files", vm="gamma") == 1
    assert value(s, "prism_vm_logical_bytes", vm="gamma") == 0


def test_procedure_counts_and_latency_grow_with_calls(served: tuple[PrismServe, Metrics]) -> None:
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
            assert c.read(fh, 0, 100).ok
        assert c.write(fh, 0, b"y").ok
        after = metrics.scrape()
    grew = {
        proc: nfs(after, "prism_rpc_calls_total", proc) - nfs(before, "prism_rpc_calls_total", proc)
        for proc in ("GETATTR", "LOOKUP", "READ", "WRITE", "CREATE", "REMOVE")
    }
    assert grew == {"GETATTR": 37, "LOOKUP": 5, "READ": 3, "WRITE": 1, "CREATE": 0, "REMOVE": 0}
    for proc in ("GETATTR", "LOOKUP", "READ", "WRITE"):
        assert nfs(after, "prism_rpc_latency_seconds_sum", proc) > nfs(
            before, "prism_rpc_latency_seconds_sum", proc
        )
        assert nfs(after, "prism_rpc_latency_seconds_max", proc) > 0
        # an NFS error status (NOENT) is a successful RPC reply, not an RPC error
        assert nfs(after, "prism_rpc_errors_total", proc) == nfs(
            before, "prism_rpc_errors_total", proc
        )
    # MOUNT calls are counted under their own program
    assert value(after, "prism_rpc_calls_total", program="mount", version="3", proc="MNT") >= 1


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
