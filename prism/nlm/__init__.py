"""File locking for NFSv3 clients: NLM v4 (with v1 and v3) and the NSM status monitor."""
