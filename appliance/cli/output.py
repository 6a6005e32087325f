"""The command line's output, human and machine: with --json every command prints exactly one JSON object
on stdout; otherwise tables, lines and progress bars (numbers for people: `appliance.api.format`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable

from rich.console import Console
from rich.table import Table

from appliance.api.ops import JSON_SCHEMA_VERSION

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(data: dict) -> None:
    payload = {"ok": data.pop("ok", True), "schema": JSON_SCHEMA_VERSION, **data}
    sys.stdout.write(json.dumps(payload, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def table(columns: Iterable[str], rows: Iterable[Iterable], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(str(c), overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    out.print(t)


class ProgressBar:
    """A byte-count progress bar on stderr when it is a terminal; silent otherwise (or with --json)."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self._p = None
        self._task = None

    def start(self, total: int) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), TextColumn("{task.fields[item]}"), console=err, transient=True)
        self._p.start()
        self._task = self._p.add_task(self.label, total=total or None, item="")

    def advance(self, nbytes: int, item: str) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=nbytes, item=item[-40:])

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None

    def callbacks(self) -> tuple[Callable[[int, int], None], Callable[[int, str], None]]:
        return (lambda _n, total: self.start(total)), self.advance


class TrainProgress:
    """Live training metrics: a bar with loss, lr, tokens/s and ETA on a terminal; a line per ~10% otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._p = None
        self._task = None
        self.total = 0
        self.every = 1

    def __call__(self, kind: str, d: dict) -> None:
        if kind == "warning":  # over-fitting: said even with --json (stderr), and kept in the run's result
            err.print(d["text"], markup=False)
            return
        if not self.enabled:
            return
        if kind == "stage" and not self.tty:
            err.print(d["text"], markup=False)
        elif kind == "data":
            err.print(f"data: {d['rows']} rows of {d['seq_len']} tokens, padding {d['padding_fraction']:.2%}"
                      f"{' (from the vault cache)' if d.get('cached') else ''}"
                      f"{_tables_said(d)}", markup=False)
        elif kind == "start":
            self._start(d)
        elif kind == "step":
            self._step(d)
        elif kind == "checkpoint" and not self.tty:
            err.print(f"checkpoint at step {d['step']}", markup=False)

    def _start(self, d: dict) -> None:
        self.total = d["max_steps"]
        self.every = max(1, self.total // 10)
        first = d.get("resume_from") or 0
        err.print(f"run {d['id']}: {self.total} steps on {d['world']} process(es)"
                  f"{f', resuming at step {first}' if first else ''}", markup=False)
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[m]}"),
                               TimeRemainingColumn(), console=err, transient=True)
            self._p.start()
            self._task = self._p.add_task("train", total=self.total, completed=first, m="")

    def _step(self, m: dict) -> None:
        text = (f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  |g| {m['grad_norm']:.2f}  "
                f"{m['tokens_per_s']:,.0f} tok/s") + (f"  val {m['val_loss']:.4f}" if m.get("val_loss") is not None
                                                      else "")
        if self._p is not None:
            self._p.update(self._task, completed=m["step"], m=text)
        elif m["step"] % self.every == 0 or m["step"] == self.total:
            err.print(f"step {m['step']}/{self.total}  {text}  eta {m['eta']:.0f} s", markup=False)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def _tables_said(d: dict) -> str:
    """How a pre-training run took table rows (data.tables), when the data had any."""
    if not d.get("table_rows"):
        return ""
    how = "left out" if d.get("tables") == "skip" else "as 'column: value' text, no row header"
    return f"; {d['table_rows']} table rows {how} (data.tables)"


class StageProgress:
    """Phases of one long command (export, quantize, ...): a bar per phase on a terminal, a line otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.phase = ""
        self._p = None
        self._task = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase != self.phase:
            self.stop()
            self.phase = phase
            if self.tty:
                from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

                self._p = Progress(TextColumn(phase), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                                   console=err, transient=True)
                self._p.start()
                self._task = self._p.add_task(phase, total=total or None)
            else:
                err.print(f"{phase} ...", markup=False)
        if self._p is not None:
            self._p.update(self._task, completed=done, total=total or None)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
