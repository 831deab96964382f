"""Comparing finished runs: the method matrix, from local files only.

Reading run directories lives in kltd.report.records, aggregation in kltd.report.aggregate, tables in
kltd.report.tables; this module turns them into a report (results.md, results.csv, plots) and prints it.
`compare()` is the one entry point (the `kltd compare` command, the sweep-end callback, the W&B uploader).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

from kltd.report.aggregate import (LOWER_IS_BETTER, CompareResult, MethodSummary, Stat, available_metrics,
                                   better_direction, check_metrics, duplicate_seed_notes, summarize)
from kltd.report.records import CompareError, is_number, is_run_dir, load_runs
from kltd.report.tables import all_tables, empty_cell, has_matrix, matrix_grid, to_rich, write_csv, write_markdown


# The matrices shown when none are named; the sweep-end callback uses the same, so `kltd compare` on a
# sweep directory reproduces exactly what the sweep printed and wrote.
DEFAULT_METRICS = ["accuracy", "reverse_kl_student_states"]


# ---------------------------------------------------------------------------------------- plot inputs


def heat_cells(rows: list[MethodSummary], metric: str):
    from kltd.report.plots import HeatCell

    prefixes, trajectories, grid = matrix_grid(rows)
    pick = min if metric in LOWER_IS_BETTER else max
    heat = []
    for prefix, line in zip(prefixes, grid):
        heat_line = []
        for trajectory, methods in zip(trajectories, line):
            means = [stat.mean for stat in (row.after(metric) for row in methods) if stat]
            text = "\n".join(f"{_wrap(row.label)}\n{_wrap(row.value_text(metric, with_n=False))}" for row in methods)
            heat_line.append(HeatCell(value=pick(means) if means else None, text=text or empty_cell(prefix, trajectory),
                                      empty=not methods))
        heat.append(heat_line)
    return prefixes, trajectories, heat


def _wrap(text: str, width: int = 30, lines: int = 3) -> str:
    # An error message must fit in a heatmap square; the full text is in results.md.
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder=" …"))


def divergence_curves(rows: list[MethodSummary]) -> dict[str, dict[str, list[float]]]:
    """Per method: the position-wise mean across seeds of each divergence curve after training."""
    curves = {}
    for row in rows:
        by_state = {}
        for state in ("student_states", "teacher_states"):
            runs = [(run.eval_after.get("divergence_by_position") or {}).get(state) or [] for run in row.completed]
            by_state[state] = _positionwise_mean(runs)
        if any(by_state.values()):
            curves[row.label] = by_state
    return curves


def _positionwise_mean(curves: list[list]) -> list[float]:
    # Curves from different seeds can differ in length (longest response); average what exists.
    length = max((len(c) for c in curves), default=0)
    means = []
    for i in range(length):
        values = [c[i] for c in curves if i < len(c) and is_number(c[i])]
        means.append(statistics.mean(values) if values else math.nan)
    return means


def history_series(rows: list[MethodSummary], key: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per method: steps, mean and std across seeds of one metrics.jsonl key."""
    series = {}
    for row in rows:
        by_step: dict[int, list[float]] = defaultdict(list)
        for run in row.runs:  # a failed run's history up to the failure still says something
            for line in run.history:
                if is_number(line.get(key)):
                    by_step[int(line["step"])].append(float(line[key]))
        if by_step:
            steps = sorted(by_step)
            stats = [Stat(by_step[s]) for s in steps]
            series[row.label] = (steps, [s.mean for s in stats], [s.std or 0.0 for s in stats])
    return series


def write_plots(result: CompareResult) -> None:
    from kltd.report import plots

    colors = plots.method_colors([row.label for row in result.rows])
    matrix = has_matrix(result.rows)
    if not matrix:
        result.notes.append("matrix skipped: no run says which prefix and trajectory it used")
    for metric in result.metrics if matrix else []:
        prefixes, trajectories, grid = heat_cells(result.rows, metric)
        path = result.out_dir / f"matrix_{metric}.png"
        result.files.append(plots.matrix_heatmap(path, metric, prefixes, trajectories, grid,
                                                 better=better_direction(metric),
                                                 unit_interval=metric in ("accuracy", "pass_at_k")))
    curves = divergence_curves(result.rows)
    if curves:
        result.files.append(plots.divergence_by_position(result.out_dir / "divergence_by_position.png", curves, colors))
    else:
        result.notes.append("divergence_by_position.png skipped: no finished run has divergence_by_position")
    loss, accuracy = history_series(result.rows, "train/loss"), history_series(result.rows, "eval/accuracy")
    if loss or accuracy:
        result.files.append(plots.learning_curves(result.out_dir / "learning_curves.png", loss, accuracy, colors))
    else:
        result.notes.append("learning_curves.png skipped: no run has train/loss or eval/accuracy in metrics.jsonl")


# ----------------------------------------------------------------------------------------- entry points


def default_out_dir(first: Path) -> Path:
    """The sweep directory itself when one was given (results sit next to the runs), else the cwd."""
    return first if first.is_dir() and not is_run_dir(first) else Path.cwd()


def compare(paths: list[Path], out: Path | None, metrics: list[str]) -> CompareResult:
    """Load every run below `paths`, aggregate by method and write results.{md,csv} and plots to `out`."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CompareError("give at least one run or sweep directory")
    runs = load_runs(paths)
    if not metrics:  # the defaults the runs have (data without an answer checker have no accuracy)
        metrics = [m for m in DEFAULT_METRICS if m in available_metrics(runs)] or DEFAULT_METRICS
    metrics = list(dict.fromkeys(metrics))
    check_metrics(metrics, runs)
    rows = summarize(runs)
    result = CompareResult(runs=runs, rows=rows, metrics=metrics, out_dir=Path(out) if out else default_out_dir(paths[0]),
                           notes=duplicate_seed_notes(rows))
    try:
        result.out_dir.mkdir(parents=True, exist_ok=True)
        write_plots(result)
        result.files.append(write_csv(runs, result.out_dir / "results.csv"))
        result.files.append(write_markdown(result, paths, result.out_dir / "results.md"))
    except OSError as error:
        raise CompareError(f"cannot write results to {result.out_dir}: {error.strerror or error}") from error
    return result


def _console():
    from rich.console import Console

    # Piped output (CI logs, tests) would otherwise be squeezed to 80 columns.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=180) if wide else Console()


def print_result(result: CompareResult, console=None) -> None:
    """The tables, any notes, and where the files went."""
    console = console or _console()
    for table in all_tables(result):
        console.print(to_rich(table))
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    console.print(f"wrote {len(result.files)} files to {result.out_dir}: " + ", ".join(p.name for p in result.files),
                  highlight=False, markup=False, soft_wrap=True)
