"""JCT CDF plots for comparing scheduling policies (PNG via matplotlib's Agg canvas).

The figure is drawn on an explicit Agg canvas rather than through pyplot, so
plotting neither needs a display nor changes the process-wide backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from distml.errors import UserError

if TYPE_CHECKING:
    from distml.cluster.simulator import SimResult


def plot_jct_cdf(
    results: Sequence[SimResult] | Mapping[str, SimResult],
    path: str | Path,
    title: str = "Job completion time CDF",
) -> Path:
    """Write one CDF line per policy (log-scaled JCT in hours) to ``path`` as PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plotting needs matplotlib; install distml[plot]") from None
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not items:
        raise UserError("nothing to plot: pass at least one simulation result")
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for result in items:
        hours = sorted(max(j, 1.0) / 3600.0 for j in result.jcts)
        fractions = [(i + 1) / len(hours) for i in range(len(hours))]
        axes.step(
            hours,
            fractions,
            where="post",
            label=f"{result.policy} (avg {result.avg_jct / 3600:.1f} h)",
        )
    axes.set_xscale("log")
    axes.set_xlabel("job completion time (hours, log scale)")
    axes.set_ylabel("fraction of jobs")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out
