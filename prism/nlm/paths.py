"""Where locked files are, for `prism locks`: a bounded search of a VM's tree by fileid.

Files record no parent, and the server learns no path from NLM (a lock names a handle), so
the operator's command walks the VM's directories breadth first, looking for every fileid
it was asked about at once, and stops after `SEARCH_BUDGET` entries; what it did not find
stays unnamed (the fileid is what a guest's `find -inum` takes).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prism.errors import StoreError
from prism.store import Store
from prism.store.types import FileType, ObjectId

SEARCH_BUDGET = 200_000
"""Directory entries one `prism locks` reads at most per VM."""


def find_paths(
    store: Store, ns_id: int, fileids: Iterable[int], budget: int = SEARCH_BUDGET
) -> dict[int, str]:
    """fileid -> a path ("/a/b") in namespace `ns_id`, for those found within `budget`."""
    wanted = set(fileids)
    found: dict[int, str] = {}
    queue: collections.deque[tuple[ObjectId, str]] = collections.deque()
    queue.append((store.root(ns_id), ""))
    while queue and wanted and budget > 0:
        dir_oid, path = queue.popleft()
        cookie, done = 0, False
        while not done and budget > 0:
            try:
                entries, done = store.readdir(dir_oid, cookie, limit=1000)
            except StoreError:
                break
            budget -= len(entries)
            for e in entries:
                if e.name in (b".", b".."):
                    continue
                child = f"{path}/{e.name.decode(errors='replace')}"
                if e.oid.fileid in wanted:
                    found[e.oid.fileid] = child
                    wanted.discard(e.oid.fileid)
                if e.type == FileType.DIR:
                    queue.append((e.oid, child))
                cookie = e.cookie
            if not entries:
                break
    return found
