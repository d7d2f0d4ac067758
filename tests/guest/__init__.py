"""QEMU guest harness for tests that need a real Linux NFS client (see harness.py)."""
