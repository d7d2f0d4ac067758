"""Store-wide commands: stats, fsck, gc, import, and the lock table of a running server."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from prism.cli.output import emit, human, progress_printer, vm_json
from prism.cli.values import UsageError, size_arg, vm_path
from prism.cli.vm import vm_info
from prism.errors import StoreError
from prism.store import Store
from vrpc.stats import read_stats as read_vrpc_stats

if TYPE_CHECKING:
    from prism.importer import QuotaShortfall


def cmd_locks(args: argparse.Namespace, store: Store) -> int:
    from prism.nlm.monitor import MonitorStateError, read_locks
    from prism.nlm.paths import find_paths

    try:
        table = read_locks(Path(args.data))
    except MonitorStateError as exc:
        raise UsageError(str(exc)) from exc
    rows = [] if table is None else table["locks"]
    if args.vm:
        rows = [r for r in rows if r["vm"] == args.vm]
    for vm in {r["vm"] for r in rows}:
        try:
            ns_id = store.namespace(vm).id
        except StoreError:
            continue
        paths = find_paths(store, ns_id, {r["fileid"] for r in rows if r["vm"] == vm})
        for r in rows:
            if r["vm"] == vm:
                r["path"] = paths.get(r["fileid"])

    def text() -> str:
        if table is None:
            return f"no server is running on {args.data}: no locks are held"
        lines = [f"{'VM':<12} {'CLIENT':<22} {'PATH':<28} {'RANGE':<20} {'TYPE':<13} SINCE"]
        for r in rows:
            if r["kind"] == "share":
                what, kind = "-", f"share a{r['access']}/d{r['deny']}"
            else:
                end = "EOF" if r["length"] == 0 else str(r["start"] + r["length"])
                what = f"{r['start']}-{end}"
                kind = r["type"] + (" (waiting)" if r["kind"] == "waiting" else "")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"]))
            client = f"{r['client']} ({r['name']})" if r["name"] else r["client"]
            path = r.get("path") or f"fileid {r['fileid']}"
            lines.append(f"{r['vm']:<12} {client:<22} {path:<28} {what:<20} {kind:<13} {since}")
        if table.get("more"):
            lines.append(f"... and {table['more']} more that the server's table leaves out")
        if table.get("grace_left"):
            lines.append(f"grace period: {table['grace_left']} s left for reclaims")
        return "\n".join(lines)

    emit(args, rows, text)
    return 0


def cmd_stats(args: argparse.Namespace, store: Store) -> int:
    vms = store.list_namespaces("vm")
    per_vm = [vm_json(vm, store.usage(vm.name)) for vm in vms]
    st = store.stats()
    vrpc = read_vrpc_stats(Path(args.data))
    data = {
        "vms": per_vm,
        "store": {
            "logical_bytes": st.logical_bytes,
            "stored_bytes": st.stored_bytes,
            "dedup_ratio": round(st.dedup_ratio, 3),
            "chunk_count": st.chunk_count,
            "segment_bytes": st.segment_bytes,
            "referenced_bytes": st.referenced_bytes,
            "dedup_bytes": st.dedup_bytes,
            "content_dedup_ratio": round(st.content_dedup_ratio, 3),
            "clone_shared_bytes": st.clone_shared_bytes,
            "disk_bytes": st.disk_bytes,
        },
        "vrpc": vrpc,
    }

    def text() -> str:
        lines = [f"{'VM':<24} {'LOGICAL':>12} {'FILES':>9} {'QUOTA':>10}"]
        for r in per_vm:
            quota = human(r["quota"]) if r["quota"] is not None else "none"
            lines.append(
                f"{r['name']:<24} {human(r['logical_bytes']):>12} {r['files']:>9} {quota:>10}"
            )
        shared = st.clone_shared_bytes
        lines += [
            "",
            f"store: logical {human(st.logical_bytes)}, stored {human(st.stored_bytes)} "
            f"in {st.chunk_count} chunks (logical/stored {st.dedup_ratio:.2f}x)",
            f"  dedup: {human(st.dedup_bytes)} of identical content written independently "
            f"stored once (ratio {st.content_dedup_ratio:.2f}x)",
            f"  clones: {human(shared)} seen by several VMs through shared layers (or holes)"
            if shared >= 0
            else f"  clones: none; snapshots or removed VMs (until `prism gc`) hold "
            f"{human(-shared)} no VM sees",
            f"  disk: segment files {human(st.segment_bytes)}, data directory "
            f"{human(st.disk_bytes)}",
        ]
        v = vrpc
        lines.append(
            "vrpc: no server is running with VRPC"
            if v is None
            else f"vrpc: {v['channels']} channels, {v['calls']} calls ({v['fast_path_hits']} on"
            f" the fast path), {v['protocol_errors']} protocol errors, {v['refused']} attaches"
            f" refused, {v['revoked']} channels revoked"
        )
        return "\n".join(lines)

    emit(args, data, text)
    return 0


def cmd_fsck(args: argparse.Namespace, store: Store) -> int:
    from prism.store.check import fsck

    report = fsck(store, repair=args.repair, progress=progress_printer(args))
    data = {
        "clean": report.clean,
        "errors": report.errors,
        "repaired": report.repaired,
        "damaged": report.damaged,
        "debris": report.debris,
        "checked_objects": report.checked_objects,
        "checked_chunks": report.checked_chunks,
        "checked_records": report.checked_records,
    }

    def text() -> str:
        lines = [f"error: {e}" for e in report.errors[:100]]
        if len(report.errors) > 100:
            lines.append(f"... and {len(report.errors) - 100} more errors")
        lines += [f"repaired: {r}" for r in report.repaired]
        lines += [f"debris: {d}" for d in report.debris]
        verdict = "clean" if report.clean else f"{len(report.errors)} errors"
        if not report.clean and not args.repair:
            verdict += " (run `prism fsck --repair`)"
        lines.append(
            f"fsck: {verdict}; checked {report.checked_objects} objects, "
            f"{report.checked_chunks} chunks"
        )
        return "\n".join(lines)

    emit(args, data, text)
    return 0 if report.clean or (args.repair and not report.damaged) else 1


def cmd_gc(args: argparse.Namespace, store: Store) -> int:
    from prism.store.gc import gc

    report = gc(store, progress=progress_printer(args))
    data = dict(vars(report))
    net = report.bytes_reclaimed  # the data directory's change, as `du -sb` sees it
    parts = [
        f"{sign}{human(n)} {what}"
        for sign, n, what in (
            ("-", report.segment_bytes_deleted, "segment files"),
            ("+", report.bytes_copied, "live chunks copied"),
            ("+", report.metadata_bytes_added, "metadata"),
        )
        if n
    ]
    emit(
        args,
        data,
        (f"gc: reclaimed {human(net)}" if net >= 0 else f"gc: the data grew by {human(-net)}")
        + (f" ({', '.join(parts)})" if parts else "")
        + f"; dropped {report.layers_dropped} "
        f"layers, merged {report.layers_merged}, freed {report.chunks_freed} chunks, removed "
        f"{report.segments_removed} and compacted {report.segments_compacted} segments",
    )
    return 0


def _over_quota(over: QuotaShortfall) -> str:
    """What an import that would not fit its VM's quota tells the operator, in one line."""
    return (
        f"{over.vm} uses {human(over.used)} of its {human(over.quota)} quota and this import "
        f"needs {human(over.needed)}, {human(over.shortfall)} more than the quota allows; "
        f"raise it with `prism vm set {over.vm} --quota {size_arg(over.fitting_quota)}` or "
        "leave things out with --exclude PATTERN"
    )


def cmd_import(args: argparse.Namespace, store: Store) -> int:
    from prism.cli.progress import import_progress
    from prism.importer import ImportOverQuota, Selection, import_tree

    src = Path(args.src)
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory; give the host directory to import")
    to = vm_path(args.to, "--to")
    vm_info(store, args.vm, "import into a VM, then take a snapshot")
    select = Selection(tuple(args.exclude), args.one_file_system)
    progress = import_progress(as_json=args.json, interval=args.progress_interval)

    def terminated(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt  # unwinds the import, which discards what it staged

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        report = import_tree(
            store, args.vm, src, to, select=select, dry_run=args.dry_run, progress=progress
        )
    except ImportOverQuota as exc:
        raise UsageError(f"{_over_quota(exc.over)} (nothing was imported)") from exc
    except OSError as exc:
        raise UsageError(
            f"cannot read {exc.filename or src}: {exc.strerror or exc}; nothing was imported"
        ) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    if report.skipped:
        print(
            f"prism: warning: skipped {len(report.skipped)} entries that changed while being "
            f"{'scanned' if report.dry_run else 'imported'} (not copied): "
            f"{', '.join(report.skipped[:20])}" + (" ..." if len(report.skipped) > 20 else ""),
            file=sys.stderr,
        )
    seconds = max(report.seconds, 1e-9)
    left_out = "".join(
        [
            f", excluded {report.excluded} entries" if report.excluded else "",
            f", did not enter {len(report.mount_points)} mount points"
            if report.mount_points
            else "",
        ]
    )
    what = (
        f"{report.files} files, {report.dirs} directories, {report.symlinks} symlinks,"
        f" {report.hardlinks} hard links, {report.specials} special files, "
        f"{human(report.bytes)}"
    )
    over = report.over_quota
    emit(
        args,
        {
            **vars(report),
            "over_quota": None
            if over is None
            else {
                **asdict(over),
                "shortfall": over.shortfall,
                "message": _over_quota(over),
            },
        },
        f"dry run: would import {what} into {args.vm}:{to}{left_out} (scanned in "
        f"{report.seconds:.1f} s; nothing was written)"
        + (f"\nover quota: {_over_quota(over)}" if over is not None else "")
        if report.dry_run
        else f"imported {what} into {args.vm}:{to} in {report.seconds:.1f} s "
        f"({report.files / seconds:.0f} files/s, {report.bytes / seconds / 1e6:.1f} MB/s)"
        f"{left_out}",
    )
    return 0
