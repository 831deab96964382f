"""Aggregating runs by method: mean ± std across seeds of every metric and cost, and the result of a
comparison (runs, one summary per method, the metrics compared, what was written)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kltd.report.records import CompareError, Run, figure, figure_names, is_number
from kltd.schema.matrix import PREFIXES, TRAJECTORIES

# eval_after keys in the order a reader expects them; others follow alphabetically.
EVAL_ORDER = ("accuracy", "avg_at_k", "pass_at_k", "reverse_kl_student_states", "forward_kl_teacher_states",
              "student_entropy", "response_length", "truncated", "exact_reverse_kl", "exact_forward_kl",
              "exact_accepted", "exact_student_entropy_rate", "exact_response_length", "exact_truncated",
              "exact_teacher_entropy_rate", "student_tokens_generated", "teacher_tokens_generated")
COST_FIELDS = ("wall_time_s", "train_time_s", "steps", "steps_per_s", "final_loss", "tokens_student_generated",
               "tokens_teacher_generated", "tokens_generated", "tokens_scored", "tokens_trained")
COUNT_FIELDS = {"steps", "tokens_student_generated", "tokens_teacher_generated", "tokens_generated", "tokens_scored",
                "tokens_trained"}
LOWER_IS_BETTER = {"reverse_kl_student_states", "forward_kl_teacher_states", "exact_reverse_kl", "exact_forward_kl"}
# the rest (entropy, length, ...) describe; neither way is better
HIGHER_IS_BETTER = {"accuracy", "avg_at_k", "pass_at_k", "exact_accepted"}


def better_direction(metric: str) -> str | None:
    name = metric.rsplit("/", 1)[-1]  # a per-set metric (gsm8k/pass_at_k) goes the way of its plain name
    return "lower" if name in LOWER_IS_BETTER else "higher" if name in HIGHER_IS_BETTER else None


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
        return stat_of(figure(run.eval_after, metric) for run in self.completed)

    def before(self, metric: str) -> Stat | None:
        return stat_of(figure(run.eval_before, metric) for run in self.completed)

    def before_rl(self, metric: str) -> Stat | None:
        """After the distillation, before the RL stage (runs with rl=grpo only)."""
        return stat_of(figure(run.eval_before_rl, metric) for run in self.completed if run.eval_before_rl)

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
    keys = {key for run in runs if run.status == "completed" for key in figure_names(run.eval_after)}
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


@dataclass
class CompareResult:
    runs: list[Run]
    rows: list[MethodSummary]
    metrics: list[str]
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # plots skipped, duplicate seeds, ...
    budget: object | None = None  # a kltd.report.budget.BudgetComparison: `kltd compare --at` (equal compute)
    against: str | None = None  # `kltd compare --against LABEL`: the method paired differences are taken from
    paired: list = field(default_factory=list)  # kltd.report.paired.PairedDifference
