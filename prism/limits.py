"""Limits and names that several layers enforce: each has its home here, once.

A leaf module (it imports nothing), so the store (`prism.store.types`), the wire
(`prism.nfs.const`), the CLI and the shared-memory control channel (`vrpc.control`) all
state the same limit without depending on each other.
"""

from __future__ import annotations

NAME_MAX = 255
"""Longest name a directory holds, in bytes (NFS PATHCONF name_max; longer gets
NAMETOOLONG)."""
SYMLINK_MAX = 4096
"""Longest symlink target, in bytes (NFS nfspath3; longer gets NAMETOOLONG)."""
NLINK_MAX = 65000
"""Most hard links to one object (NFS PATHCONF linkmax): one more LINK gets EMLINK."""

VM_NAME_MAX = 63
"""Longest VM or snapshot name, in characters (ASCII, so also bytes)."""
VM_NAME_PATTERN = rf"[a-z0-9][a-z0-9_.-]{{0,{VM_NAME_MAX - 1}}}"
"""A VM or snapshot name: a-z 0-9 _ . -, starting with a letter or digit. What `/VM` and
`/VM@SNAP` export, what the store and the CLI accept. Unanchored, to embed in larger
patterns; anchor it with `re.fullmatch`."""

READ_CACHE_MB = 256
"""Verified chunk bytes a process keeps in memory for the next small read of them, in MiB
(`prism serve --read-cache-mb`; 0 keeps none): the store's read cache (`segments`)."""
