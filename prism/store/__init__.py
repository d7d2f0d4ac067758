"""The Prism store (see `prism.store.store` for the layout and crash ordering)."""

from prism.store.store import Store, check_name, check_vm_name, parse_clients
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
