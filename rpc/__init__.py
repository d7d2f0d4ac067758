"""ONC-RPC v2 (RFC 5531) and XDR (RFC 4506) as a sans-IO core with thin transports.

- `rpc.xdr`: XDR Packer/Unpacker.
- `rpc.message`: call/reply headers, auth flavors, encoders and decoders (no I/O).
- `rpc.record`: record marking for streams (no I/O).
- `rpc.server`: the dispatch table (`Program`/`Procedure`), `RpcDispatcher`, the duplicate
  request cache and stats (no I/O).
- `rpc.transport`: asyncio TCP and UDP pumps around `RpcDispatcher`.
- `rpc.client`: a small synchronous client for tests and tools.
- `rpc.portmap`: portmapper v2 program and client helpers.
"""
