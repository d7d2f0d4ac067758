"""VRPC: the shared-memory RPC transport for co-located VMs (phase 1a: the ring and its codec).

The ring lives in C under `native/` (ABI and rules in `native/README.md`), bound with cffi as
`vrpc._native`, with a pure-Python twin in `vrpc.pyring`; `vrpc.native` chooses one
(`BACKEND`) and `vrpc.ring` holds what both share. `vrpc.control` encodes and decodes the
ATTACH / ATTACHED / REFUSED control messages. The server glue that will feed the ring into the
same sans-IO RPC core as TCP and UDP (`rpc.server`) comes later; `vrpc.abi` mirrors the header.
"""
