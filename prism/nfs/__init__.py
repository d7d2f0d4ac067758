"""NFSv3 and MOUNTv3 (RFC 1813): constants, wire types and codecs, and a test client.

`prism.nfs.const` names every number, `prism.nfs.wire` holds the XDR types and the
procedure tables (and imports nothing from the store), `prism.nfs.service` answers the
procedures over the store, converting through `prism.nfs.convert`, and `prism.nfs.client`
is a synchronous client for tests and tools.
"""
