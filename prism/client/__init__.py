"""prism.client: a synchronous, file-like client for one VM of a Prism server.

    from prism.client import connect
    with connect("nfs://127.0.0.1/web?mountport=20048", uid=1000, gid=1000) as c:
        c.makedirs("/srv/www", exist_ok=True)              # as uid 1000: needs the right
        with c.open("/srv/www/index.html", "w") as f:     # a standard io.TextIOWrapper
            f.write("<h1>hello</h1>\\n")                   # close() commits to disk
        c.stat("/srv/www/index.html").st_size              # os.stat_result
        c.transport, c.transport_reason                    # "vrpc", "local server, ..."

Theory of operation: `connect` parses the URL, picks a transport (`_transport`: TCP, or
the shared-memory VRPC ring of a server on this host), MOUNTs the VM's export for its root
handle and asks FSINFO for the largest READ and WRITE. The `Client` then maps each file operation
to NFSv3 procedures: paths are resolved from the root with one LOOKUP per component
(following symbolic links as the kernel does, ".." by the server), and nothing is cached,
so every answer is the server's at that moment. `open` returns the standard `io` objects
over a raw NFS file (`_file`): reads are READs of up to rtmax bytes; writes are UNSTABLE
WRITEs that the file keeps a copy of until `flush()` or `close()` COMMITs them, and writes
again if the server restarted in between (the write verifier changed). `Client.nfs` is
`prism.nfs.client.NfsClient` over the same transport, for every NFSv3 procedure by handle
(`Client.root`, `Client.handle(path)`, `f.handle`).

Errors are `OSError`s with `errno`, `strerror` and the path (`filename`, and `filename2`
for two-path calls), so Python gives the usual subclasses: FileNotFoundError,
FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError, ... The errno is
the one the server's status stands for (`prism.nfs.status.errno_for`). A server that cannot
be reached raises ConnectionError, one that does not answer in `timeout` seconds
TimeoutError, and a transport that cannot be used `TransportUnavailable`.

Server restarts: the client reconnects (over VRPC: reattaches, woken at once by the
server's end) by itself and resends the call in flight (same xid, same VRPC client id),
for up to `timeout` seconds; handles, open files and their positions stay valid. A
non-idempotent call (CREATE, REMOVE, RENAME...) whose reply was lost in a restart may be
answered as if done twice (EEXIST, ENOENT), as with any NFSv3 client.

Identity: calls carry AUTH_SYS with `uid`, `gid` and `groups` (by default this process's),
and the server checks permissions with them; as root the client connects from a privileged
port, which VMs created `--secure` require. `umask` (0o022) applies to new files and
directories, as a kernel client applies the process's.

Threads: a `Client` may be shared by threads. Its calls are serialized on one connection
(one in flight at a time), and each method is as atomic as the NFS procedures it makes
(a path walk and the operation are separate calls). An open file object must be used by
one thread at a time, as with Python's own text files; use one `Client` per thread or
process to get calls in parallel.
"""

from __future__ import annotations

import os

from prism.client._client import Client, DirEntry
from prism.client._file import DEFAULT_COMMIT_LIMIT, RawFile
from prism.client._transport import (
    DEFAULT_VRPC_SOCKET,
    VRPC_SOCKET_ENV,
    TransportUnavailable,
    open_transport,
    parse_url,
)
from prism.nfs.client import auth_sys

__all__ = [
    "DEFAULT_VRPC_SOCKET",
    "VRPC_SOCKET_ENV",
    "Client",
    "DirEntry",
    "RawFile",
    "TransportUnavailable",
    "connect",
]

DEFAULT_TIMEOUT = 60.0
"""Seconds one call may take, reconnections included, before TimeoutError."""
MAX_GROUPS = 16
"""Supplementary groups AUTH_SYS carries."""


def connect(
    url: str,
    *,
    uid: int | None = None,
    gid: int | None = None,
    groups: tuple[int, ...] | list[int] | None = None,
    transport: str = "auto",
    token: bytes | str | None = None,
    vrpc_socket: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    umask: int = 0o022,
    commit_limit: int = DEFAULT_COMMIT_LIMIT,
) -> Client:
    """Connect to "nfs://HOST[:PORT]/VM[?mountport=N]" (PORT defaults to 2049; without
    mountport the portmapper on HOST is asked).

    `transport`: "tcp"; "vrpc" (the shared-memory ring of a server on this host, found at
    `vrpc_socket`, else $PRISM_VRPC_SOCKET, else /run/prism/vrpc.sock; `token` is the VM's
    VRPC token, if the server asks for one); "auto" uses VRPC when it can and TCP otherwise.
    `client.transport` and `client.transport_reason` say which was used and why.
    `uid`/`gid`/`groups` default to this process's (its groups only when `uid` is not given).
    """
    if groups is None:
        groups = os.getgroups() if uid is None else ()
    cred = auth_sys(
        os.getuid() if uid is None else uid,
        os.getgid() if gid is None else gid,
        tuple(groups)[:MAX_GROUPS],
    )
    target = parse_url(url)
    chosen, reason = open_transport(
        target,
        cred,
        transport=transport,
        vrpc_socket=vrpc_socket,
        token=token,
        timeout=timeout,
    )
    return Client(chosen, reason, target.export, umask=umask, commit_limit=commit_limit)
