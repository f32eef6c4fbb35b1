"""What the user sees on rank 0: a progress bar, epoch lines and the summary table.

Built on rich. On a terminal the bar updates in place; in logs (no TTY) it
stays quiet and the epoch lines and the final table carry the information.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class ProgressReporter:
    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        done_steps: int = 0,
        title: str = "train",
        bar: bool = True,
    ) -> None:
        self.enabled = enabled
        self.console = Console(highlight=False)
        self._progress: Progress | None = None
        if enabled and bar and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                title, total=total_steps, completed=done_steps, epoch=0, loss="-"
            )

    def advance(self, loss: float, epoch: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, epoch=epoch, loss=f"{loss:.4f}")

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.console.print(summary_table(summary))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"distml run summary: {summary.get('name', '')}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("model / dataset", f"{summary.get('model')} / {summary.get('dataset')}"),
        (
            "workers (backend, device)",
            f"{summary.get('world_size')} ({summary.get('backend')}, {summary.get('device')})",
        ),
        (
            "global batch (accum steps)",
            f"{summary.get('global_batch_size')} ({summary.get('accumulation_steps')})",
        ),
        ("steps / epochs", f"{summary.get('steps')} / {summary.get('epochs')}"),
        ("test accuracy", _fmt(summary.get("test_accuracy"))),
        ("test loss", _fmt(summary.get("test_loss"))),
        ("wall time (s)", _fmt(summary.get("wall_s"))),
        ("samples/s (median step)", _fmt(summary.get("samples_per_s"))),
        (
            "step time split: data / compute / comm (ms)",
            " / ".join(
                _fmt(1000 * summary.get(k, 0.0))
                for k in ("median_data_s", "median_compute_s", "median_comm_s")
            ),
        ),
        ("data-loading rate (samples/s)", _fmt(summary.get("data_samples_per_s"))),
        ("training rate (samples/s)", _fmt(summary.get("train_samples_per_s"))),
        ("bound by", str(summary.get("bound", "-"))),
        ("last checkpoint", str(summary.get("checkpoint") or "-")),
    ]
    for key in ("compression_ratio",):
        if key in summary:
            rows.append((key.replace("_", " "), _fmt(summary[key])))
    for name, value in rows:
        table.add_row(name, value)
    return table
