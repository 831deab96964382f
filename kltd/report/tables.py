"""Aggregating runs by method (mean ± std across seeds) and the tables built from that: the method
matrix, quality next to cost, the flat list, unfinished runs; rendered to rich and markdown, plus the
per-run CSV and the results.md report."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kltd.spec.matrix import PREFIXES, TRAJECTORIES, cell_error
from kltd.report.records import CompareError, Run, is_number

if TYPE_CHECKING:  # only for annotations: compare.py imports this module
    from kltd.report.compare import CompareResult

# eval_after keys in the order a reader expects them; others follow alphabetically.
EVAL_ORDER = ("accuracy", "pass_at_k", "reverse_kl_student_states", "forward_kl_teacher_states", "student_entropy",
              "response_length", "student_tokens_generated", "teacher_tokens_generated")
COST_FIELDS = ("wall_time_s", "train_time_s", "steps", "steps_per_s", "final_loss", "tokens_student_generated",
               "tokens_teacher_generated", "tokens_generated", "tokens_scored", "tokens_trained")
COUNT_FIELDS = {"steps", "tokens_student_generated", "tokens_teacher_generated", "tokens_generated", "tokens_scored",
                "tokens_trained"}
LOWER_IS_BETTER = {"reverse_kl_student_states", "forward_kl_teacher_states"}
HIGHER_IS_BETTER = {"accuracy", "pass_at_k"}  # the rest (entropy, length, ...) describe; neither way is better


def better_direction(metric: str) -> str | None:
    return "lower" if metric in LOWER_IS_BETTER else "higher" if metric in HIGHER_IS_BETTER else None


# ---------------------------------------------------------------------------------------- aggregation


@dataclass
class Stat:
    """Mean and sample standard deviation across seeds (std is None for a single seed)."""

    values: list[float]
    places: int | None = None  # fixed decimal places (0 for counts); default: three significant digits

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def decimals(self) -> int:
        """Three significant digits of the mean unless fixed; the std gets the same decimal places."""
        if self.places is not None:
            return self.places
        if self.mean == 0 or not math.isfinite(self.mean):
            return 3
        return min(6, max(0, 2 - math.floor(math.log10(abs(self.mean)))))

    def mean_text(self) -> str:
        return f"{self.mean:,.{self.decimals}f}"

    def text(self, with_n: bool = True) -> str:
        if self.std is None:
            return self.mean_text()
        spread = f"{self.mean_text()} ± {self.std:,.{self.decimals}f}"
        return f"{spread} (n={self.n})" if with_n else spread


def stat_of(values, places: int | None = None) -> Stat | None:
    numbers = [float(v) for v in values if is_number(v)]
    return Stat(numbers, places) if numbers else None


@dataclass
class MethodSummary:
    """All runs of one method (one setting of its config), across seeds."""

    label: str
    method: str | None
    prefix: str | None
    trajectory: str | None
    runs: list[Run]

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.status == "completed"]

    def after(self, metric: str) -> Stat | None:
        return stat_of(run.eval_after.get(metric) for run in self.completed)

    def before(self, metric: str) -> Stat | None:
        return stat_of(run.eval_before.get(metric) for run in self.completed)

    def cost(self, name: str) -> Stat | None:
        places = 0 if name in COUNT_FIELDS else None
        return stat_of((run.costs().get(name) for run in self.completed), places)

    def seeds_text(self) -> str:
        extra = self._unfinished_counts()
        return f"{len(self.completed)} ({', '.join(extra)})" if extra else str(len(self.completed))

    def problem_text(self) -> str:
        """Why there is no number: the first failure's error, else "missing"."""
        failed = [run for run in self.runs if run.status == "failed"]
        return failed[0].status_text if failed else "missing"

    def value_text(self, metric: str, with_n: bool = True) -> str:
        """mean ± std (n=3, 1 failed): the number, and how many seeds it does and doesn't rest on."""
        if not self.completed:
            return self.problem_text()
        stat = self.after(metric)
        if stat is None:
            return "n/a"
        counts = [f"n={stat.n}"] * (with_n and stat.n > 1) + self._unfinished_counts()
        return stat.text(with_n=False) + (f" ({', '.join(counts)})" if counts else "")

    def _unfinished_counts(self) -> list[str]:
        failed = sum(run.status == "failed" for run in self.runs)
        missing = sum(run.status == "missing" for run in self.runs)
        return [f"{failed} failed"] * bool(failed) + [f"{missing} missing"] * bool(missing)


def _cell_order(prefix: str | None, trajectory: str | None) -> tuple[int, int]:
    return (PREFIXES.index(prefix) if prefix in PREFIXES else len(PREFIXES),
            TRAJECTORIES.index(trajectory) if trajectory in TRAJECTORIES else len(TRAJECTORIES))


def _seed_order(run: Run) -> tuple[bool, float]:
    return (not is_number(run.seed), run.seed if is_number(run.seed) else 0)


def summarize(runs: list[Run]) -> list[MethodSummary]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.label, run.method, run.prefix, run.trajectory)].append(run)
    rows = [MethodSummary(label, method, prefix, trajectory, sorted(group, key=_seed_order))
            for (label, method, prefix, trajectory), group in groups.items()]
    return sorted(rows, key=lambda row: (*_cell_order(row.prefix, row.trajectory), row.label))


def available_metrics(runs: list[Run]) -> list[str]:
    keys = {key for run in runs if run.status == "completed" for key, v in run.eval_after.items() if is_number(v)}
    return [k for k in EVAL_ORDER if k in keys] + sorted(keys - set(EVAL_ORDER))


def check_metrics(metrics: list[str], runs: list[Run]) -> None:
    known = available_metrics(runs)
    unknown = [metric for metric in metrics if metric not in known]
    if known and unknown:  # with no finished run there is nothing to check against; cells show the failures
        raise CompareError(f"unknown metric '{unknown[0]}'; runs have: {', '.join(known)}")


def duplicate_seed_notes(rows: list[MethodSummary]) -> list[str]:
    """Same method and seed twice (e.g. two sweeps given): both count as samples; say so."""
    notes = []
    for row in rows:
        seeds = [run.seed for run in row.completed if run.seed is not None]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1}):
            notes.append(f"{row.label} has {seeds.count(seed)} finished runs with seed {seed}; each counts as a sample")
    return notes


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


def matrix_table(rows: list[MethodSummary], metric: str) -> TableData:
    prefixes, trajectories, grid = matrix_grid(rows)
    body = [[prefix, *("\n".join(f"{row.label}\n{row.value_text(metric)}" for row in methods)
                       or empty_cell(prefix, trajectory) for trajectory, methods in zip(trajectories, line))]
            for prefix, line in zip(prefixes, grid)]
    return TableData(f"Method matrix: {metric} after training (mean ± std across seeds)",
                     ["prefix \\ trajectory", *trajectories], body)


def empty_cell(prefix: str, trajectory: str) -> str:
    return "invalid" if cell_error(prefix, trajectory) else "not run"


def quality_cost_table(rows: list[MethodSummary], metric: str) -> TableData:
    body = [[row.label, row.value_text(metric, with_n=False), _stat_text(row.cost("wall_time_s")),
             _stat_text(row.cost("tokens_generated")), _stat_text(row.cost("tokens_scored"))] for row in rows]
    return TableData(f"Quality next to cost ({metric})",
                     ["method", metric, "wall time (s)", "tokens generated (student+teacher)", "tokens scored"], body)


def flat_table(rows: list[MethodSummary]) -> TableData:
    headers = ["method", "prefix", "trajectory", "seeds", "accuracy before → after", "reverse KL (student states)",
               "forward KL (teacher states)", "entropy", "length", "wall time (s)", "tokens generated"]
    body = []
    for row in rows:
        if not row.completed:
            body.append([row.label, row.prefix or "?", row.trajectory or "?", row.seeds_text(), row.problem_text()]
                        + ["—"] * (len(headers) - 5))
            continue
        before = row.before("accuracy")
        body.append([row.label, row.prefix or "?", row.trajectory or "?", row.seeds_text(),
                     f"{_mean_text(before)} → {_stat_text(row.after('accuracy'))}",
                     *(_stat_text(row.after(key)) for key in ("reverse_kl_student_states", "forward_kl_teacher_states",
                                                              "student_entropy", "response_length")),
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


def summary_tables(result: CompareResult) -> list[TableData]:
    tables = [quality_cost_table(result.rows, result.metrics[0]), flat_table(result.rows)]
    unfinished = unfinished_runs_table(result.runs)
    return tables + ([unfinished] if unfinished else [])


def all_tables(result: CompareResult) -> list[TableData]:
    return [*matrix_tables(result).values(), *summary_tables(result)]


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


def csv_columns(runs: list[Run]) -> list[str]:
    return ["sweep", "run_dir", "method", "variant", "prefix", "trajectory", "seed", "status", "error",
            *available_metrics(runs), "accuracy_before", *COST_FIELDS]


def _csv_value(value):
    # NaN/inf (a diverged loss) and None both mean "no number": an empty cell, which every reader accepts
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def write_csv(runs: list[Run], path: Path) -> Path:
    columns = csv_columns(runs)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            row = {"sweep": run.sweep, "run_dir": str(run.run_dir), "method": run.method, "variant": run.variant,
                   "prefix": run.prefix, "trajectory": run.trajectory, "seed": run.seed, "status": run.status,
                   "error": run.error, "accuracy_before": run.eval_before.get("accuracy")}
            row.update({key: value for key, value in run.eval_after.items() if is_number(value)})
            row.update(run.costs())
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
    for table in summary_tables(result):
        parts += ["", to_markdown(table)]
    for name, caption in (("divergence_by_position.png", "Per-position divergence"), ("learning_curves.png", "Learning curves")):
        if name in pngs:
            parts += ["", f"## {caption}", "", f"![{caption}]({name})"]
    if result.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    path.write_text("\n".join(parts) + "\n")
    return path

