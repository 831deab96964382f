"""The tables a comparison shows, built from its aggregate (kltd.report.aggregate): the method matrix,
quality next to cost, the flat list, unfinished runs; rendered to rich and markdown, plus the per-run CSV
and the results.md report."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kltd.report.aggregate import COST_FIELDS, CompareResult, MethodSummary, Stat, available_metrics
from kltd.report.records import Run, is_number
from kltd.schema.matrix import PREFIXES, TRAJECTORIES, cell_error

# --------------------------------------------------------------------------------------------- tables


@dataclass
class TableData:
    """A table as plain strings, rendered to the terminal (rich) and to markdown from the same data."""

    title: str
    headers: list[str]
    rows: list[list[str]]


def matrix_cells(rows: list[MethodSummary]) -> dict[tuple[str, str], list[MethodSummary]]:
    cells: dict[tuple[str, str], list[MethodSummary]] = defaultdict(list)
    for row in rows:
        if row.prefix in PREFIXES and row.trajectory in TRAJECTORIES:
            cells[(row.prefix, row.trajectory)].append(row)
    return cells


def matrix_grid(rows: list[MethodSummary]) -> tuple[list[str], list[str], list[list[list[MethodSummary]]]]:
    """The axes (only prefixes and trajectories some run used) and each cell's methods, row by row; shared
    by the text matrix and the heatmap so both always show the same grid."""
    prefixes = [p for p in PREFIXES if any(row.prefix == p for row in rows)]
    trajectories = [t for t in TRAJECTORIES if any(row.trajectory == t for row in rows)]
    cells = matrix_cells(rows)
    return prefixes, trajectories, [[cells.get((p, t), []) for t in trajectories] for p in prefixes]


def matrix_table(rows: list[MethodSummary], metric: str, *, title: str | None = None,
                 value_text: Callable[[MethodSummary], str] | None = None) -> TableData:
    """The matrix of one metric: after training by default, or any reading of each method (`value_text`, e.g.
    the value at a cost budget) under its own title."""
    value_text = value_text or (lambda row: row.value_text(metric))
    prefixes, trajectories, grid = matrix_grid(rows)
    body = [[prefix, *("\n".join(f"{row.label}\n{value_text(row)}" for row in methods)
                       or empty_cell(prefix, trajectory) for trajectory, methods in zip(trajectories, line))]
            for prefix, line in zip(prefixes, grid)]
    return TableData(title or f"Method matrix: {metric} after training (mean ± std across seeds)",
                     ["prefix \\ trajectory", *trajectories], body)


def empty_cell(prefix: str, trajectory: str) -> str:
    return "invalid" if cell_error(prefix, trajectory) else "not run"


def quality_cost_table(rows: list[MethodSummary], metric: str) -> TableData:
    body = [[row.label, row.value_text(metric, with_n=False), _stat_text(row.cost("wall_time_s")),
             _stat_text(row.cost("tokens_generated")), _stat_text(row.cost("tokens_scored"))] for row in rows]
    return TableData(f"Quality next to cost ({metric})",
                     ["method", metric, "wall time (s)", "tokens generated (student+teacher)", "tokens scored"], body)


# the exact figures (data=markov: kltd.train.evaluation.exact_questions), as columns of the flat table where a run
# has them
EXACT_COLUMNS = {"exact_reverse_kl": "exact reverse KL", "exact_forward_kl": "exact forward KL",
                 "exact_accepted": "accepted (exact)"}


def flat_table(rows: list[MethodSummary]) -> TableData:
    exact = [key for key in EXACT_COLUMNS if any(row.after(key) for row in rows if row.completed)]
    headers = ["method", "prefix", "trajectory", "seeds", "accuracy before → after", "reverse KL (student states)",
               "forward KL (teacher states)", *(EXACT_COLUMNS[key] for key in exact), "entropy", "length",
               "wall time (s)", "tokens generated"]
    body = []
    for row in rows:
        if not row.completed:
            body.append([row.label, row.prefix or "—", row.trajectory or "—", row.seeds_text(), row.problem_text()]
                        + ["—"] * (len(headers) - 5))
            continue
        before = row.before("accuracy")
        body.append([row.label, row.prefix or "—", row.trajectory or "—", row.seeds_text(),
                     f"{_mean_text(before)} → {_stat_text(row.after('accuracy'))}",
                     *(_stat_text(row.after(key)) for key in ("reverse_kl_student_states", "forward_kl_teacher_states",
                                                              *exact, "student_entropy", "response_length")),
                     _stat_text(row.cost("wall_time_s")), _stat_text(row.cost("tokens_generated"))])
    return TableData("All methods (eval after training unless noted; mean ± std across seeds)", headers, body)


def _stat_text(stat: Stat | None) -> str:
    return stat.text(with_n=False) if stat else "n/a"


def _mean_text(stat: Stat | None) -> str:
    # "before" is the same initial student for every seed; its spread is noise worth no column width
    return stat.mean_text() if stat else "n/a"


def unfinished_runs_table(runs: list[Run]) -> TableData | None:
    unfinished = [run for run in runs if run.status != "completed"]
    if not unfinished:
        return None
    return TableData("Failed or incomplete runs", ["run", "method", "seed", "status"],
                     [[str(run.run_dir), run.label, str(run.seed if run.seed is not None else "?"), run.status_text]
                      for run in unfinished])


def has_matrix(rows: list[MethodSummary]) -> bool:
    return bool(matrix_cells(rows))


def matrix_tables(result: CompareResult) -> dict[str, TableData]:
    """One matrix per requested metric (none when no run can be placed in the grid)."""
    return {metric: matrix_table(result.rows, metric) for metric in result.metrics} if has_matrix(result.rows) else {}


def rl_table(rows: list[MethodSummary], metrics: list[str]) -> list[TableData]:
    """Runs with an RL stage (rl=grpo): each metric after the distillation and after RL, and what RL changed (the
    paper's question: does the distillation objective's ranking survive RL?)."""
    rows = [row for row in rows if any(run.eval_before_rl for run in row.completed)]
    if not rows:
        return []
    headers = ["method", *(f"{metric} {when}" for metric in metrics for when in ("before RL", "after RL", "RL change"))]
    body = []
    for row in rows:
        cells = [row.label]
        for metric in metrics:
            before, after = row.before_rl(metric), row.after(metric)
            change = f"{after.mean - before.mean:+.4g}" if before and after else "n/a"
            cells += [_stat_text(before), _stat_text(after), change]
        body.append(cells)
    return [TableData("Before and after the RL stage (mean ± std across seeds)", headers, body)]


def summary_tables(result: CompareResult) -> list[TableData]:
    tables = [*rl_table(result.rows, result.metrics), quality_cost_table(result.rows, result.metrics[0]),
              flat_table(result.rows)]
    unfinished = unfinished_runs_table(result.runs)
    return tables + ([unfinished] if unfinished else [])


def budget_tables(result: CompareResult) -> list[TableData]:
    """The matrices at one cost budget (`kltd compare --at`), when asked for and a matrix can be drawn."""
    return result.budget.tables() if result.budget is not None and has_matrix(result.rows) else []


def paired_table(result: CompareResult) -> list[TableData]:
    """`--against`: each method minus the reference, question by question, with its 95% paired interval."""
    if not result.paired:
        return []
    metrics = list(dict.fromkeys(d.metric for d in result.paired))
    labels = list(dict.fromkeys(d.label for d in result.paired))
    cells = {(d.label, d.metric): d for d in result.paired}

    def text(d) -> str:
        if d.difference is None:
            return d.problem
        span = f" [{d.interval[0]:+.3g}, {d.interval[1]:+.3g}]" if d.interval else ""
        return f"{d.difference:+.3g}{span}"

    return [TableData(f"Paired differences against {result.against} (after training; 95% bootstrap interval "
                      "over the same questions)", ["method", *metrics],
                      [[label, *(text(cells[label, m]) for m in metrics)] for label in labels])]


def all_tables(result: CompareResult) -> list[TableData]:
    return [*matrix_tables(result).values(), *budget_tables(result), *paired_table(result), *summary_tables(result)]


def to_rich(table: TableData):
    from rich.table import Table
    from rich.text import Text

    rich_table = Table(title=table.title, show_lines=True)
    for i, header in enumerate(table.headers):
        rich_table.add_column(header, overflow="fold", style="bold" if i == 0 else None)
    for row in table.rows:
        rich_table.add_row(*(Text(cell) for cell in row))  # Text: error messages may contain [brackets]
    return rich_table


def to_markdown(table: TableData) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = [f"### {table.title}", "", "| " + " | ".join(cell(h) for h in table.headers) + " |",
             "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files


def file_stem(metric: str) -> str:
    """A metric name as part of a file name (per-set metrics such as gsm8k/avg_at_k hold a slash)."""
    return metric.replace("/", "_")


def csv_columns(runs: list[Run]) -> list[str]:
    metrics = available_metrics(runs)
    before_rl = [f"{m}_before_rl" for m in metrics] if any(run.eval_before_rl for run in runs) else []
    return ["sweep", "run_dir", "method", "variant", "prefix", "trajectory", "seed", "status", "error", *metrics,
            "accuracy_before", *before_rl, *COST_FIELDS]


def _csv_value(value):
    # NaN/inf (a diverged loss) and None both mean "no number": an empty cell, which every reader accepts
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def write_csv(runs: list[Run], path: Path, budget=None) -> Path:
    """One row per run; with `budget` (a kltd.report.budget.BudgetComparison) also the budget and each run's
    value at it."""
    columns = csv_columns(runs) + (budget.csv_columns() if budget is not None else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            row = {"sweep": run.sweep, "run_dir": str(run.run_dir), "method": run.method, "variant": run.variant,
                   "prefix": run.prefix, "trajectory": run.trajectory, "seed": run.seed, "status": run.status,
                   "error": run.error, "accuracy_before": run.eval_before.get("accuracy")}
            row.update({key: value for key, value in run.eval_after.items() if is_number(value)})
            row.update({f"{key}_before_rl": value for key, value in run.eval_before_rl.items() if is_number(value)})
            row.update(run.costs())
            if budget is not None:
                row.update(budget.csv_values(run))
            writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return path


def write_markdown(result: CompareResult, paths: list[Path], path: Path) -> Path:
    counts = {status: sum(run.status == status for run in result.runs) for status in ("completed", "failed", "missing")}
    sweeps = sorted({run.sweep for run in result.runs if run.sweep})
    parts = ["# kltd compare", "",
             f"{len(result.runs)} runs ({counts['completed']} completed, {counts['failed']} failed, "
             f"{counts['missing']} missing) from {', '.join(f'`{p}`' for p in paths)}"
             + (f"; sweeps: {', '.join(sweeps)}" if sweeps else "") + "."]
    pngs = {p.name for p in result.files if p.suffix == ".png"}
    for metric, table in matrix_tables(result).items():
        parts += ["", to_markdown(table)]
        if f"matrix_{metric}.png" in pngs:
            parts += ["", f"![{metric} matrix](matrix_{metric}.png)"]
    if result.budget is not None:
        parts += _budget_markdown(result, pngs)
    for table in paired_table(result) + summary_tables(result):
        parts += ["", to_markdown(table)]
    for name, caption in (("divergence_by_position.png", "Per-position divergence"), ("learning_curves.png", "Learning curves")):
        if name in pngs:
            parts += ["", f"## {caption}", "", f"![{caption}]({name})"]
    if result.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    path.write_text("\n".join(parts) + "\n")
    return path


def _budget_markdown(result: CompareResult, pngs: set[str]) -> list[str]:
    """The comparison at equal compute: the matrices at the budget, their heatmaps and the Pareto plots."""
    budget = result.budget  # a kltd.report.budget.BudgetComparison
    parts = ["", f"## At equal {budget.at}: {budget.text}", "", budget.note[0].upper() + budget.note[1:] + "."]
    tables = dict(zip(budget.metrics, budget_tables(result)))
    for metric in budget.metrics:
        stem = file_stem(metric)
        heatmap, pareto = f"matrix_{stem}_at_{budget.at}.png", f"pareto_{stem}_{budget.at}.png"
        if metric in tables:
            parts += ["", to_markdown(tables[metric])]
        if heatmap in pngs:
            parts += ["", f"![{metric} at {budget.text}]({heatmap})"]
        if pareto in pngs:
            parts += ["", f"![{metric} against {budget.at}]({pareto})"]
    return parts
