"""Parsing the values operators type: sizes, VM paths, clone sources; and UsageError, the
one-line complaint (exit status 2) every command gives for bad input."""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from prism.limits import VM_NAME_PATTERN
from prism.store import CloneSource

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(\d+)([KMGTP]?)(iB)?", re.IGNORECASE)
_DECIMAL_SIZE = re.compile(r"(\d+)([KMGTP])B", re.IGNORECASE)
_FRACTION_SIZE = re.compile(r"(\d*\.\d+)([KMGTP])(iB)?", re.IGNORECASE)
MAX_SIZE = (1 << 63) - 1
"""The largest size NFSv3 clients handle (they treat size3 as a signed 64-bit offset)."""
SOURCE = re.compile(
    rf"(?P<ns>{VM_NAME_PATTERN})(?:@(?P<snap>{VM_NAME_PATTERN}))?"
    r"(?::(?P<path>[^=]+)(?:=(?P<dest>.+))?)?"
)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def parse_size(text: str) -> int | None:
    """'512M' or '512MiB' -> 512 MiB, '10G', plain bytes, or 'none' -> None. Units are
    binary; '10GB' is refused as ambiguous (10^10 or 10 GiB?) rather than guessed."""
    if text.strip().lower() == "none":
        return None
    m = _SIZE.fullmatch(text.strip())
    if not m:
        f = _FRACTION_SIZE.fullmatch(text.strip())
        if f:
            raise UsageError(
                f"invalid size {text!r}: sizes are whole numbers; write {_whole(f)} instead"
            )
        d = _DECIMAL_SIZE.fullmatch(text.strip())
        if d:
            raise UsageError(
                f"ambiguous size {text!r}: Prism's units are binary; write "
                f"{d.group(1)}{d.group(2).upper()} for {d.group(1)} {d.group(2).upper()}iB, "
                "or the number of bytes"
            )
        raise UsageError(
            f"invalid size {text!r}: use whole bytes or a unit like 512M, 10G, or 'none'"
        )
    size = int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
    if size > MAX_SIZE:
        raise UsageError(
            f"size {text!r} is larger than any filesystem can hold (NFS sizes stop below "
            "8 EiB); give a size like 10G or 2T, or 'none' for no limit"
        )
    return size


def size_arg(n: int) -> str:
    """A size argument (`--quota`) of at least `n` bytes: rounded up in the largest unit that
    adds less than a sixteenth, so that it reads well and stays close ('3073K', '17G')."""
    for unit, factor in sorted(SIZE_UNITS.items(), key=lambda kv: -kv[1]):
        if factor > 1 and n >= 16 * factor:
            return f"{-(-n // factor)}{unit}"
    return str(n)


def _whole(m: re.Match[str]) -> str:
    """'1.5G' -> '1536M': the fraction in the largest unit that makes it whole."""
    size = Fraction(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
    for unit, factor in sorted(SIZE_UNITS.items(), key=lambda kv: -kv[1]):
        if size >= factor and (size / factor).denominator == 1:
            return f"{size // factor}{unit}"
    return f"{round(size)}"


def vm_path(text: str, where: str) -> str:
    """An operator's path inside a VM, normalised; refuses relative paths and paths that
    climb above the VM's root (which would name something outside its tree)."""
    if not text.startswith("/"):
        raise UsageError(f"{where}: path {text!r} must be absolute (start at the VM's root '/')")
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UsageError(
                    f"{where}: path {text!r} is outside the VM's tree ('..' above '/'); "
                    "give a path inside the VM"
                )
            parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def parse_source(text: str) -> CloneSource:
    m = SOURCE.fullmatch(text)
    if not m:
        raise UsageError(
            f"invalid source {text!r}: use VM, VM@SNAP, VM:/path, VM:/path=/dest or "
            "VM@SNAP:/path=/dest"
        )
    path = vm_path(m.group("path") or "/", text)
    dest = vm_path(m.group("dest"), text) if m.group("dest") is not None else None
    return CloneSource(m.group("ns"), m.group("snap"), path, dest)


def _label(src: CloneSource) -> str:
    return src.ns + (f"@{src.snapshot}" if src.snapshot else "") + f":{src.path}"


def check_conflicts(sources: Sequence[CloneSource]) -> None:
    """Refuse a composition in which a later subtree would hide an earlier one entirely.

    Sources laid over '/' merge with what is there (that is how a base VM is overlaid), and
    a subtree may be laid inside an earlier one; but placing a subtree at the same
    destination as an earlier one, or at one of its ancestors, would discard the earlier
    source without a trace, so it is certainly a mistake.
    """
    placed: list[tuple[str, CloneSource]] = []
    for src in sources:
        dest = src.target
        if dest != "/":
            for earlier_dest, earlier in placed:
                if earlier_dest == dest or earlier_dest.startswith(dest + "/"):
                    raise UsageError(
                        f"conflicting sources: {_label(src)} -> {dest} would hide "
                        f"{_label(earlier)} -> {earlier_dest}; drop one or give it another "
                        "destination with =/path"
                    )
            placed.append((dest, src))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_VM_PATH = re.compile(rf"(?P<vm>{VM_NAME_PATTERN}):(?P<path>/.*)")


def parse_vm_path(text: str) -> tuple[str, str]:
    """'VM:/path' -> (VM, normalised absolute path)."""
    m = _VM_PATH.fullmatch(text)
    if not m:
        raise UsageError(f"invalid location {text!r}: use VM:/path (an absolute path in a VM)")
    parts: list[str] = []
    for part in m.group("path").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UsageError(f"path {m.group('path')!r} leaves the VM's tree; drop the '..'")
        parts.append(part)
    return m.group("vm"), "/" + "/".join(parts)
