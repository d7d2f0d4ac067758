"""How commands print: human text or --json, sizes in binary units, a VM as a JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from prism.access import export_flags
from prism.store.types import NamespaceInfo


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def vm_json(info: NamespaceInfo, usage: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": info.name,
        "kind": info.kind,
        "export": "/" + info.name,
        "clients": list(info.clients),
        "quota": info.quota,
        "readonly": info.readonly or info.export.read_only,
        "options": export_flags(info),
        "created": info.created_ns // 1_000_000_000,
        "secure": info.export.secure,
        "squash": info.export.squash,
        "anon_uid": info.export.anon_uid,
        "anon_gid": info.export.anon_gid,
        "vrpc_users": list(info.export.vrpc_users),
        "vrpc_groups": list(info.export.vrpc_groups),
        "vrpc_token": bool(info.export.vrpc_token),
    }
    if usage is not None:
        out["logical_bytes"] = usage.logical_bytes
        out["files"] = usage.files
    out["shares"] = [
        {"path": sh.path, "source": f"{sh.source_ns}:{sh.source_path}", "rw": sh.rw}
        for sh in info.shares
    ]
    return out


def emit(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text() if callable(text) else text)


def progress_printer(args: argparse.Namespace) -> Callable[[str], None] | None:
    if getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    return lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)
