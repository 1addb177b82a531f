"""Console output (rich) and the JSONL log; silent on every process but the main one."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from trainer_pkg.errors import UserError

SHOWN_METRICS = ("accuracy", "f1", "precision", "recall", "loss", "num_samples")


class RunConsole:
    """What the user sees. Every method is a no-op off the main process."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        # markup off: paths, column names and texts from the user's data are printed as they are
        # (rich would take "[run]" for a style, and "[/x]" raises).
        self.console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
        self.progress: Progress | None = None
        self.task = None

    def print(self, *args, **kwargs) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def warn(self, text: str) -> None:
        self.print(text, style="yellow")

    def rule(self, title: str) -> None:
        if self.enabled:
            self.console.rule(title)

    def start_progress(self, description: str, total: int, completed: int = 0) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}", markup=False), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False, refresh_per_second=2,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=completed, status="")

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        if self.progress is None:
            return
        fields = {"status": status} if status is not None else {}
        self.progress.update(self.task, advance=steps, **fields)
        if status is not None and not self.console.is_terminal:
            # A log file (SLURM, CI) gets no live bar: leave a line per log interval instead.
            task = self.progress.tasks[0]
            eta = f", eta {task.time_remaining:.0f}s" if task.time_remaining is not None else ""
            self.console.print(f"{task.description} {task.completed:.0f}/{task.total:.0f}: {status}{eta}")

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def metrics_table(self, title: str, metrics: dict) -> None:
        self.table(title, {name: metrics[name] for name in SHOWN_METRICS if name in metrics}, heading="metric")

    def table(self, title: str, values: dict, heading: str = "setting") -> None:
        if not self.enabled:
            return
        table = Table(title=title, title_justify="left")
        table.add_column(heading)
        table.add_column("value", justify="right")
        for name, value in values.items():
            table.add_row(name, formatted(value))
        self.console.print(table)


def formatted(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.4f}"


class JsonlLog:
    """Append-only log of training steps and evaluations (one JSON object per line)."""

    def __init__(self, path: Path | None, also: Callable[[str, dict], None] | None = None):
        self.path = path
        self.start = time.time()
        # Experiment trackers get the same records, so the log and the dashboards never disagree.
        self.also = also

    def write(self, kind: str, **record) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "time": round(time.time() - self.start, 3), **record}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.also is not None:
            self.also(kind, record)


def write_output(path: Path, text: str, flag: str = "--output") -> None:
    """Write a file the user asked for, turning OS errors into a one-line error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot write ({error.strerror})") from None


def print_json(data: dict) -> None:
    """Machine-readable result on stdout (progress and tables go to stderr)."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()
