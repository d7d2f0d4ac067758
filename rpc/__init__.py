"""ONC-RPC v2 (RFC 5531) and XDR (RFC 4506) as a sans-IO core with thin transports."""
