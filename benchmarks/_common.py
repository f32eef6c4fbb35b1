"""Helpers shared by distml's benchmarks: machine facts, statistics, JSON output, tables.

Every benchmark writes one JSON file to ``benchmarks/results/`` holding its
settings, the exact command line, the machine it ran on (torch version,
cores, load average) and its raw measurements, and prints a rich table of the
headline figures. These helpers keep that shape identical across benchmarks.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (what ``uptime`` prints); empty where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """Facts that decide whether two result files are comparable."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_default_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def command_line() -> str:
    """The command that produced a result, re-runnable from the repo root."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as indented JSON, creating the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A right-aligned rich table (first column left-aligned) on stdout."""
    table = Table(title=title)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # don't squeeze columns in logs and pipes
    console.print(table)
