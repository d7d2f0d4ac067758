"""VRPC: the shared-memory RPC transport for co-located VMs and programs.

The ring lives in C under `native/` (ABI and rules in `native/README.md`), bound with cffi as
`vrpc._native`, with a pure-Python twin in `vrpc.pyring`; `vrpc.native` chooses one
(`BACKEND`) and `vrpc.ring` holds what both share. `vrpc.control` encodes and decodes the
ATTACH / ATTACHED / REFUSED control messages; `vrpc.server` is `prism serve`'s control socket
and the pump that feeds each channel's ring into the same sans-IO RPC core as TCP and UDP
(`rpc.server`); `vrpc.client` attaches and calls; `vrpc.stats` carries the counters to
`prism stats`; `vrpc.abi` mirrors the header.
"""
