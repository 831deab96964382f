"""The PNGs of `kltd compare`: the method-matrix heatmap, per-position divergence, learning curves, and
quality against cost (the Pareto plot of `kltd compare --at`).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no display is needed and the
global backend of whoever imports kltd (a notebook, a Hydra callback) is left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

FAILED_GREY = "#9e9e9e"  # a cell that ran but has no number: failed or missing
EMPTY_GREY = "#eeeeee"  # a cell nobody ran (or an invalid one)
DPI = 130


@dataclass
class HeatCell:
    value: float | None  # None: greyed out
    text: str
    empty: bool = False  # no run at all in this cell (lighter grey than a failed one)


def method_colors(labels: list[str]) -> dict[str, tuple]:
    """One colour per method, the same in every plot."""
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: palette(i % palette.N) for i, label in enumerate(labels)}


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png")
    return path


def _text_color(rgba) -> str:
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def matrix_heatmap(path: Path, metric: str, prefixes: list[str], trajectories: list[str], grid: list[list[HeatCell]],
                   *, better: str | None = "higher", unit_interval: bool = False, title: str | None = None) -> Path:
    """prefix rows x trajectory columns, coloured by the metric; failed/missing/empty cells grey.

    `better`: "higher", "lower" (the colour map is flipped so that better is always brighter) or None for
    a descriptive metric such as entropy or length, where neither direction is better.
    """
    most_lines = max((cell.text.count("\n") + 1 for line in grid for cell in line), default=1)
    row_height = max(1.25, 0.2 * most_lines + 0.4)  # tall enough for the busiest cell's text
    figure = _new_figure(max(7.5, 2.9 * len(trajectories) + 2.2), row_height * len(prefixes) + 1.6)
    axes = figure.add_subplot()
    values = [cell.value for line in grid for cell in line if cell.value is not None]
    low, high = (0.0, 1.0) if unit_interval or not values else (min(values), max(values))
    if low == high:  # one value, or all equal: still give the colour bar a range
        low, high = low - 0.5, high + 0.5
    norm = Normalize(low, high)
    cmap = colormaps["viridis_r" if better == "lower" else "viridis"]
    for row, line in enumerate(grid):
        for column, cell in enumerate(line):
            color = EMPTY_GREY if cell.empty else FAILED_GREY if cell.value is None else cmap(norm(cell.value))
            axes.add_patch(_square(column, row, color))
            axes.text(column, row, cell.text, ha="center", va="center", fontsize=8.5, color=_text_color(to_rgba(color)),
                      fontstyle="italic" if cell.value is None else "normal")
    axes.set_xlim(-0.5, len(trajectories) - 0.5)
    axes.set_ylim(len(prefixes) - 0.5, -0.5)
    axes.set_xticks(range(len(trajectories)), trajectories)
    axes.set_yticks(range(len(prefixes)), prefixes)
    axes.set_xlabel("trajectory (whose next-token choice supervises)")
    axes.set_ylabel("prefix (which states)")
    axes.tick_params(length=0)
    for side in axes.spines.values():
        side.set_visible(False)
    colorbar = figure.colorbar(_scalar_mappable(norm, cmap), ax=axes, shrink=0.85)
    colorbar.set_label(f"{metric} ({better} is better)" if better else metric)
    title = title or f"Method matrix: {metric} after training"
    axes.set_title(f"{title}\nmean ± std over seeds; grey = failed or missing", fontsize=10)
    return _save(figure, path)


def _square(x: float, y: float, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=color, edgecolor="white", linewidth=2)


def _scalar_mappable(norm, cmap):
    from matplotlib.cm import ScalarMappable

    return ScalarMappable(norm=norm, cmap=cmap)


def divergence_by_position(path: Path, curves: dict[str, dict[str, list[float]]], colors: dict[str, tuple]) -> Path:
    """Per-position divergence after training: solid = reverse KL on student states, dashed = forward KL
    on teacher states. A gap that grows with position is exposure bias."""
    figure = _new_figure(10, 4.8)
    axes = figure.add_subplot()
    for label, by_state in curves.items():
        for state, style in (("student_states", "-"), ("teacher_states", "--")):
            curve = by_state.get(state) or []
            if curve:
                axes.plot(range(len(curve)), curve, linestyle=style, color=colors.get(label), linewidth=1.6)
    # Legends sit outside the axes: with many methods they would hide the curves' ends.
    figure.legend(handles=[Line2D([], [], color=colors.get(label), label=label) for label in curves],
                  title="method", loc="outside right upper", fontsize=8, title_fontsize=8)
    figure.legend(handles=[Line2D([], [], color="black", linestyle="-", label="student states: KL(q‖p)"),
                           Line2D([], [], color="black", linestyle="--", label="teacher states: KL(p‖q)")],
                  title="states", loc="outside right lower", fontsize=8, title_fontsize=8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("response position (token index)")
    axes.set_ylabel("divergence per token (nats)")
    axes.set_title("Per-position divergence after training, mean over seeds")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def learning_curves(path: Path, loss: dict[str, tuple], accuracy: dict[str, tuple], colors: dict[str, tuple]) -> Path:
    """train/loss and eval/accuracy against step, one line per method (mean over seeds, band = ±1 std)."""
    figure = _new_figure(12, 4.6)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    _draw_series(loss_axes, loss, colors, marker=None)
    _draw_series(accuracy_axes, accuracy, colors, marker="o")
    loss_axes.set(title="Training loss", xlabel="step", ylabel="train/loss")
    accuracy_axes.set(title="Held-out accuracy (greedy)", xlabel="step", ylabel="eval/accuracy")
    for axes, series in ((loss_axes, loss), (accuracy_axes, accuracy)):
        axes.grid(alpha=0.3)
        if not series:
            axes.text(0.5, 0.5, "no data in metrics.jsonl", ha="center", va="center", transform=axes.transAxes, color="grey")
    labels = list(dict.fromkeys([*loss, *accuracy]))
    figure.legend(handles=[Line2D([], [], color=colors.get(label), label=label) for label in labels],
                  loc="outside right upper", title="method", fontsize=8, title_fontsize=8)
    figure.suptitle("Learning curves (mean over seeds; band = ±1 std)")
    return _save(figure, path)


def _draw_series(axes, series: dict[str, tuple], colors: dict[str, tuple], marker: str | None) -> None:
    band_alpha = 0.15 if len(series) <= 4 else 0.07  # many overlapping bands turn to mud
    for label, (steps, means, stds) in series.items():
        color = colors.get(label)
        axes.plot(steps, means, color=color, marker=marker, markersize=3.5, linewidth=1.5, label=label)
        if any(s > 0 and math.isfinite(s) for s in stds):
            axes.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=color, alpha=band_alpha, linewidth=0)


def pareto(path: Path, *, metric: str, axis: str, curves: dict[str, tuple[list[float], list[float]]],
           finals: dict[str, tuple[float, float]], front: list[str], colors: dict[str, tuple], budget: float,
           budget_label: str, better: str | None) -> Path:
    """Quality against cost: each method's evaluation curve (thin, mean over seeds), its final point (after
    training, at its total cost), the Pareto frontier (the non-dominated final points, ringed and joined) and
    the budget the matrix was read at (a dotted vertical line)."""
    figure = _new_figure(10, 5.4)
    axes = figure.add_subplot()
    for label, (costs, values) in curves.items():
        axes.plot(costs, values, color=colors.get(label), linewidth=1.2, alpha=0.6, marker="o", markersize=2.5)
    for label, (cost, value) in finals.items():
        axes.scatter([cost], [value], color=colors.get(label), s=55, zorder=3)
    if front:
        axes.plot([finals[label][0] for label in front], [finals[label][1] for label in front], color="black",
                  linestyle="--", linewidth=1.0, zorder=2)
        axes.scatter([finals[label][0] for label in front], [finals[label][1] for label in front], s=190,
                     facecolors="none", edgecolors="black", linewidths=1.6, zorder=4)
    axes.axvline(budget, color="grey", linestyle=":", linewidth=1.4)
    labels = dict.fromkeys([*curves, *finals])
    handles = [Line2D([], [], color=colors.get(label), marker="o", label=label) for label in labels]
    handles += [Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="none",
                       label="Pareto frontier")]
    handles += [Line2D([], [], color="grey", linestyle=":", label=f"budget ({budget_label})")]
    figure.legend(handles=handles, loc="outside right upper", title="method", fontsize=8, title_fontsize=8)
    axes.set_xlabel(axis)
    axes.set_ylabel(f"{metric} ({better} is better)" if better else metric)
    frontier = "ringed: the Pareto frontier" if better else f"no frontier: {metric} has no better direction"
    axes.set_title(f"{metric} against {axis}\nlines: evaluations during training, dots: after training (mean over "
                   f"seeds); {frontier}", fontsize=9)
    axes.grid(alpha=0.3)
    return _save(figure, path)
