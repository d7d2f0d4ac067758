"""How `prism import` shows its progress: the `prism.importer.Progress` the CLI gives it.

The import's pre-scan counts entries and bytes first (phase "scan"); the copy (phase
"copy") then measures its progress in bytes against that total (in entries when the tree
holds no bytes at all), with the entries done beside it. tqdm keeps the elapsed time, the
rate (a moving average) and the ETA.

On a terminal: tqdm's bar, redrawn in place on stderr; the scan's counter is cleared when
the copy begins and the copy's bar stays, so the summary follows on a line of its own.
Elsewhere (a log, a pipe, journald), or with --json: one line on stderr every `interval`
seconds, the first after `interval` seconds (a short import prints none), each a complete
record that a script can grep, e.g.

    prism import: phase=scan entries=120000 bytes=8053063680 elapsed=10s
    prism import: phase=copy percent=37 bytes=2979069952/8053063680 entries=40721/120000 \
elapsed=30s rate=97.6MB/s eta=52s

(one line; `eta=?` until a rate is known), or with --json a JSON object per line:
{"progress": {"phase", "percent", "bytes", "total_bytes", "entries", "total_entries", "unit",
"elapsed", "rate", "eta"}} (times in seconds, rate in bytes/s or entries/s as `unit` says,
totals, percent, rate and eta null in the scan). The lines are drawn by overriding tqdm's
`display`, the extension point its documentation names.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from tqdm import tqdm

from prism.importer import ImportReport

TERMINAL_REDRAW_SECONDS = 0.2
TERMINAL_SIZE = (80, 24)
"""Columns and rows assumed on a terminal that does not tell its own (a bare pseudo-terminal),
where tqdm would take -1 for them and draw nothing."""


def _terminal_size(file: IO[str]) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(file.fileno())
    except (OSError, ValueError, AttributeError):
        return TERMINAL_SIZE
    return (size.columns or TERMINAL_SIZE[0], size.lines or TERMINAL_SIZE[1])


class _Meter(tqdm):
    """One phase's tqdm, with the import's own figures for the bar or the line."""

    monitor_interval = 0  # no monitor thread: each update checks the time itself

    def __init__(
        self,
        phase: str,
        goal: ImportReport | None,
        by_bytes: bool,
        line: str | None,
        file: IO[str],
        **kwargs: Any,
    ) -> None:
        self.phase = phase
        self.goal = goal
        self.by_bytes = by_bytes
        self.line = line
        """None: draw tqdm's bar; "text" or "json": print one line per display."""
        self.done = ImportReport()
        super().__init__(file=file, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().format_dict
        d["entries"] = f"{self.done.entries}" + (
            f"/{self.goal.entries}" if self.goal is not None else ""
        )
        d["bytes"] = tqdm.format_sizeof(self.done.bytes, "B")
        return d

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.line is None:
            return bool(super().display(msg, pos))
        if msg is not None:  # tqdm clearing its line: a log has nothing to clear
            return False
        self.fp.write(self.record() + "\n")
        self.fp.flush()
        return True

    def record(self) -> str:
        d = super().format_dict
        done, goal = self.done, self.goal
        rate = d["rate"]
        percent = eta = None
        if goal is not None:
            measure = goal.bytes if self.by_bytes else goal.entries
            percent = 100.0 * d["n"] / measure if measure else 100.0
            if rate:
                eta = max(measure - d["n"], 0) / rate
        if self.line == "json":
            fields = {
                "phase": self.phase,
                "percent": None if percent is None else round(percent, 1),
                "bytes": done.bytes,
                "total_bytes": None if goal is None else goal.bytes,
                "entries": done.entries,
                "total_entries": None if goal is None else goal.entries,
                "elapsed": round(d["elapsed"], 1),
                "rate": None if goal is None or rate is None else round(rate, 1),
                "unit": "bytes" if self.by_bytes else "entries",
                "eta": None if eta is None else round(eta, 1),
            }
            return json.dumps({"progress": fields}, sort_keys=True)
        elapsed = f"elapsed={d['elapsed']:.0f}s"
        if goal is None:
            return f"prism import: phase=scan entries={done.entries} bytes={done.bytes} {elapsed}"
        if rate is None:
            speed = "rate=?"
        elif self.by_bytes:
            speed = f"rate={rate / 1e6:.1f}MB/s"
        else:
            speed = f"rate={rate:.0f}entries/s"
        return (
            f"prism import: phase=copy percent={percent:.0f} bytes={done.bytes}/{goal.bytes} "
            f"entries={done.entries}/{goal.entries} {elapsed} {speed} "
            + (f"eta={eta:.0f}s" if eta is not None else "eta=?")
        )


class ImportProgress:
    """A `prism.importer.Progress` on `file` (stderr): a bar, or lines (see the module)."""

    def __init__(self, *, lines: str | None, interval: float, file: IO[str] | None = None) -> None:
        self.lines = lines
        self.interval = interval
        self.file = file or sys.stderr
        self.meter: _Meter | None = None

    def _open(self, total: ImportReport | None) -> _Meter:
        """The meter of the scan (`total` None) or of the copy."""
        by_bytes = total is not None and total.bytes > 0
        if self.lines is not None:
            # miniters=0: every update checks the clock, even one that moved no bytes
            timing: dict[str, Any] = {
                "mininterval": self.interval,
                "delay": self.interval,
                "miniters": 0,
            }
        else:
            columns, rows = _terminal_size(self.file)
            timing = {"mininterval": TERMINAL_REDRAW_SECONDS, "ncols": columns, "nrows": rows}
        if total is None:
            bar = "{desc}: {n_fmt} entries, {bytes} [{elapsed}]"
            shape: dict[str, Any] = {"desc": "scanning"}
        elif by_bytes:
            bar = (
                "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B, {entries} entries "
                "[{elapsed}<{remaining}, {rate_fmt}]"
            )
            shape = {"total": total.bytes, "unit": "B", "unit_scale": True, "unit_divisor": 1000}
        else:
            bar = "{desc}: {percentage:3.0f}%|{bar}| {entries} entries [{elapsed}<{remaining}]"
            shape = {"total": total.entries, "unit": " entries"}
        return _Meter(
            phase="scan" if total is None else "copy",
            goal=total,
            by_bytes=by_bytes,
            line=self.lines,
            file=self.file,
            bar_format=bar,
            desc=shape.pop("desc", "importing"),
            # a terminal keeps the copy's bar above the summary; a log needs no last line
            leave=self.lines is None and total is not None,
            **shape,
            **timing,
        )

    def _show(self, done: ImportReport) -> None:
        meter = self.meter
        assert meter is not None
        meter.done = done
        n = done.bytes if meter.by_bytes else done.entries
        meter.update(n - meter.n)

    def scanning(self, found: ImportReport) -> None:
        if self.meter is None:
            self.meter = self._open(None)
        self._show(found)

    def importing(self, total: ImportReport) -> None:
        self.close()
        self.meter = self._open(total)

    def advance(self, done: ImportReport) -> None:
        self._show(done)

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()
            self.meter = None


def import_progress(*, as_json: bool, interval: float) -> ImportProgress | None:
    """The progress display for this stderr: a bar on a terminal (without --json); else
    a line every `interval` seconds (JSON with --json); None when `interval` is 0 there."""
    if not as_json and sys.stderr.isatty():
        return ImportProgress(lines=None, interval=interval)
    if interval <= 0:
        return None
    return ImportProgress(lines="json" if as_json else "text", interval=interval)
