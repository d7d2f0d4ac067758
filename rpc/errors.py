"""Error bases shared by the RPC layer, named for whose fault they are (as in h11).

`RemoteProtocolError`: the peer sent bytes that break the protocol (a record too large, a
call header that cannot be decoded). The transport answers, drops or closes; it never crashes.
Our own misuse of an API (encoding a value out of range) raises plain `ValueError`.
"""

from __future__ import annotations


class RemoteProtocolError(Exception):
    """The peer violated the ONC-RPC protocol."""
