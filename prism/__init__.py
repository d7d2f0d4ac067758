"""Prism: a virtualization-aware userspace NFSv3 server over a content-addressed store."""

__version__ = "0.1.0"
