"""The Prism store (`prism.store.store` is the facade and names the rooms behind it:
`schema` holds the on-disk layout, `txn` the crash ordering)."""

from prism.store.layers import check_vm_name, parse_clients
from prism.store.store import Store
from prism.store.tree import check_name
from prism.store.types import (
    CHUNK_SIZE,
    Attr,
    CloneSource,
    Cred,
    DirEntry,
    FileType,
    FsStat,
    NamespaceInfo,
    ObjectId,
    SetAttr,
    StoreStats,
    Usage,
)

__all__ = [
    "CHUNK_SIZE",
    "Attr",
    "CloneSource",
    "Cred",
    "DirEntry",
    "FileType",
    "FsStat",
    "NamespaceInfo",
    "ObjectId",
    "SetAttr",
    "Store",
    "StoreStats",
    "Usage",
    "check_name",
    "check_vm_name",
    "parse_clients",
]
