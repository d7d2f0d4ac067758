"""NFS file handles: the object's lasting identity, sealed with a per-store key.

Layout (31 bytes, well under NFS3_FHSIZE): version u8 | namespace u32 | volume u16 |
inode u64 | MAC 16 bytes, where the MAC is HMAC-SHA256 (truncated) over the first 15 bytes
with the store's secret. A handle therefore survives restarts and renames (it names the
object, not a path), names its VM (so the server checks the caller's address against that
VM's clients), and cannot be forged or re-pointed at another VM without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from prism.store.types import ObjectId

HANDLE_VERSION = 1
_BODY = struct.Struct(">BIHQ")
MAC_SIZE = 16
HANDLE_SIZE = _BODY.size + MAC_SIZE


class BadHandle(ValueError):
    """Not a handle this server made (wrong size, version or MAC): NFS3ERR_BADHANDLE."""


CACHE_SIZE = 65536


class HandleCodec:
    """Seals and opens handles; remembers recent ones so a hot handle costs a dict lookup."""

    def __init__(self, secret: bytes) -> None:
        self._key = secret
        self._encoded: dict[tuple[int, int, int], bytes] = {}
        self._decoded: dict[bytes, ObjectId] = {}

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:MAC_SIZE]

    def encode(self, oid: ObjectId) -> bytes:
        return self.encode_ids(oid.ns, oid.vol, oid.ino)

    def encode_ids(self, ns: int, vol: int, ino: int) -> bytes:
        """`encode` without building an ObjectId (READDIRPLUS makes one handle per entry)."""
        handle = self._encoded.get((ns, vol, ino))
        if handle is None:
            body = _BODY.pack(HANDLE_VERSION, ns, vol, ino)
            handle = body + self._mac(body)
            self._remember(ObjectId(ns, vol, ino), handle)
        return handle

    def _remember(self, oid: ObjectId, handle: bytes) -> None:
        if len(self._encoded) >= CACHE_SIZE:
            self._encoded.clear()
            self._decoded.clear()
        self._encoded[(oid.ns, oid.vol, oid.ino)] = handle
        self._decoded[handle] = oid

    def decode(self, handle: bytes) -> ObjectId:
        known = self._decoded.get(handle)
        if known is not None:
            return known
        if len(handle) != HANDLE_SIZE:
            raise BadHandle(f"handle of {len(handle)} bytes")
        body, mac = handle[: _BODY.size], handle[_BODY.size :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise BadHandle("handle MAC does not match")
        version, ns, vol, ino = _BODY.unpack(body)
        if version != HANDLE_VERSION:
            raise BadHandle(f"handle version {version}")
        oid = ObjectId(ns, vol, ino)
        self._remember(oid, bytes(handle))
        return oid
