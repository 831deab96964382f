"""Comparing finished runs: the method matrix, from local files only.

Reading run directories lives in kltd.report.records, aggregation in kltd.report.aggregate, tables in
kltd.report.tables, the comparison at equal compute (`--at`) in kltd.report.budget; this module turns them
into a report (results.md, results.csv, plots) and prints it.
`compare()` is the one entry point (the `kltd compare` command, the sweep-end callback, the W&B uploader).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

from kltd.report.aggregate import (CompareResult, MethodSummary, Stat, available_metrics,
                                   better_direction, check_metrics, duplicate_seed_notes, summarize)
from kltd.report.budget import AXES, check_budget_metrics, compare_at_budget, write_pareto
from kltd.report.records import CompareError, is_number, is_run_dir, load_runs
from kltd.report.tables import (all_tables, budget_tables, empty_cell, file_stem, has_matrix, matrix_grid, to_rich,
                                write_csv, write_markdown)


# The matrices shown when none are named, those of them the runs have; the sweep-end callback uses the same, so
# `kltd compare` on a sweep directory reproduces exactly what the sweep printed and wrote. The exact figures are
# data=markov's (kltd.train.evaluation.exact_questions).
DEFAULT_METRICS = ["accuracy", "reverse_kl_student_states", "exact_reverse_kl", "exact_accepted"]


# ---------------------------------------------------------------------------------------- plot inputs


def heat_cells(rows: list[MethodSummary], metric: str, value=None, value_text=None):
    """The heatmap's cells: each method's value after training, or any other reading of it (`value` gives its
    Stat, `value_text` its text, e.g. at a cost budget)."""
    from kltd.report.plots import HeatCell

    value = value or (lambda row: row.after(metric))
    value_text = value_text or (lambda row: row.value_text(metric, with_n=False))
    prefixes, trajectories, grid = matrix_grid(rows)
    pick = min if better_direction(metric) == "lower" else max
    heat = []
    for prefix, line in zip(prefixes, grid):
        heat_line = []
        for trajectory, methods in zip(trajectories, line):
            means = [stat.mean for stat in (value(row) for row in methods) if stat]
            text = "\n".join(f"{_wrap(row.label)}\n{_wrap(value_text(row))}" for row in methods)
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
        path = result.out_dir / f"matrix_{file_stem(metric)}.png"
        result.files.append(plots.matrix_heatmap(path, metric, prefixes, trajectories, grid,
                                                 better=better_direction(metric),
                                                 unit_interval=metric in ("accuracy", "pass_at_k")))
    if result.budget is not None:
        write_budget_plots(result, colors, matrix)
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


def write_budget_plots(result: CompareResult, colors: dict, matrix: bool) -> None:
    """`--at`: the matrix at the budget as a heatmap and the Pareto plot (quality against cost), per metric."""
    from kltd.report import plots

    budget = result.budget
    for metric in budget.metrics:
        if matrix:
            prefixes, trajectories, grid = heat_cells(
                result.rows, metric, value=lambda row: budget.stat(row, metric),
                value_text=lambda row: budget.value_text(row, metric, with_n=False))
            path = result.out_dir / f"matrix_{file_stem(metric)}_at_{budget.at}.png"
            unit = metric.rsplit("/", 1)[-1] in ("accuracy", "pass_at_k")
            result.files.append(plots.matrix_heatmap(path, metric, prefixes, trajectories, grid,
                                                     better=better_direction(metric), unit_interval=unit,
                                                     title=f"Method matrix: {metric} at {budget.text}"))
        pareto = write_pareto(budget, metric, result.out_dir, colors)
        if pareto is None:
            result.notes.append(f"pareto_{file_stem(metric)}_{budget.at}.png skipped: no finished run has "
                                f"eval/{metric} with {AXES[budget.at][0]} in metrics.jsonl")
        else:
            result.files.append(pareto)
        if not better_direction(metric):
            result.notes.append(f"pareto_{file_stem(metric)}_{budget.at}.png has no frontier: {metric} has no "
                                "better direction")


# ----------------------------------------------------------------------------------------- entry points


def default_out_dir(first: Path) -> Path:
    """The sweep directory itself when one was given (results sit next to the runs), else the cwd."""
    return first if first.is_dir() and not is_run_dir(first) else Path.cwd()


def compare(paths: list[Path], out: Path | None, metrics: list[str], at: str | None = None,
            budget: float | None = None, against: str | None = None) -> CompareResult:
    """Load every run below `paths`, aggregate by method and write results.{md,csv} and plots to `out`.

    `at` ("flops", "tokens", "time") adds the comparison at equal compute (kltd.report.budget): every run read
    at one budget of that cost, `budget` or by default the largest every finished run reached. `against` (a method's
    label) adds each other method's paired difference from it, question by question (kltd.report.paired)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CompareError("give at least one run or sweep directory")
    if budget is not None and at is None:
        raise CompareError("--budget needs --at flops, --at tokens or --at time (which cost the budget is of)")
    runs = load_runs(paths)
    if not metrics:  # the defaults the runs have (data without an answer checker have no accuracy)
        # no finished run to ask: the matrices every task has, their cells showing why the runs failed
        metrics = [m for m in DEFAULT_METRICS if m in available_metrics(runs)] or DEFAULT_METRICS[:2]
    metrics = list(dict.fromkeys(metrics))
    if at is None:
        check_metrics(metrics, runs)
    else:  # a metric evaluated during training (eval/<set>/<metric>) may be missing from the summary
        check_budget_metrics(metrics, runs)
    rows = summarize(runs)
    result = CompareResult(runs=runs, rows=rows, metrics=metrics, out_dir=Path(out) if out else default_out_dir(paths[0]),
                           notes=duplicate_seed_notes(rows))
    if at is not None:
        result.budget = compare_at_budget(runs, rows, metrics, at, budget)
    if against is not None:
        from kltd.report.paired import paired_differences

        result.against, result.paired = against, paired_differences(rows, metrics, against)
    try:
        result.out_dir.mkdir(parents=True, exist_ok=True)
        write_plots(result)
        result.files.append(write_csv(runs, result.out_dir / "results.csv", result.budget))
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
    budget_titles = {table.title for table in budget_tables(result)}
    for table in all_tables(result):
        if table.title in budget_titles:  # a long title would wrap to the table's width: a line of its own
            console.print(table.title, style="italic", highlight=False, markup=False, soft_wrap=True)
            table = dataclasses.replace(table, title="")
        console.print(to_rich(table))
    for note in result.notes + ([result.budget.note] if result.budget is not None else []):
        console.print(f"note: {note}", highlight=False, markup=False)
    console.print(f"wrote {len(result.files)} files to {result.out_dir}: " + ", ".join(p.name for p in result.files),
                  highlight=False, markup=False, soft_wrap=True)
