"""VRPC: the shared-memory RPC transport for co-located VMs (not built yet).

The ring itself will live in C under `native/`, bound with cffi; it will feed the same
sans-IO RPC core as the TCP and UDP transports (see `rpc.server`).
"""
