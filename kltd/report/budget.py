"""Comparing runs at equal compute: each run's evaluation curve read at one cost budget (`kltd compare --at`).

A run's metrics.jsonl holds its evaluations (`eval/<metric>`, at step 0, every eval.every steps and at the
last step) and its cumulative costs (`cost/flops`, `cost/tokens_processed`, `cost/wall_time_s`), in one row
or in several rows of the same step: rows are merged by step. An evaluation at step 0 without a cost costs 0
(nothing was spent before training).

The value of a run at a budget is read off its curve by linear interpolation between the two evaluations
that bracket the budget (the evaluation itself where one sits exactly at the budget). A run whose last
evaluation cost less than the budget "does not reach" it: it is marked, never extrapolated. The default
budget is the largest that every finished run reached: the smallest, over runs, of the cost of its last
evaluation. A method's value is the mean ± std across its seeds of their values at the budget.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from kltd.report.aggregate import MethodSummary, Stat, available_metrics, better_direction
from kltd.report.records import CompareError, Run, is_number
from kltd.report.tables import TableData, file_stem, matrix_table

# --at NAME -> (the metrics.jsonl key, how a budget of it is written, the axis label)
AXES = {
    "flops": ("cost/flops", "FLOPs", "training compute (FLOPs)"),
    "tokens": ("cost/tokens_processed", "tokens", "tokens processed"),
    "time": ("cost/wall_time_s", "s", "wall time (s)"),
}
EVAL_PREFIX = "eval/"
# why a finished run has no value at the budget
NO_COSTS, NOT_REACHED, NOT_EVALUATED, NONE_BEFORE = ("no cost records", "does not reach", "not evaluated",
                                                   "no evaluation before it")
INTERPOLATION_NOTE = ("values at the budget are read off each run's evaluation curve by linear interpolation between "
                      "the two evaluations that bracket the budget; a run whose last evaluation is below the budget "
                      "is marked 'does not reach', never extrapolated")


def number_text(value: float) -> str:
    """Three significant digits, powers of ten as 1.2e12 (no '+', no leading zeros)."""
    if value != 0 and not 1e-3 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{float(f'{value:.3g}'):g}"  # 3456 -> 3460, not 3.46e+03


def budget_text(at: str, value: float) -> str:
    return f"{number_text(value)} {AXES[at][1]}"


# ------------------------------------------------------------------------------------------- one run


def merged_history(run: Run) -> dict[int, dict]:
    """metrics.jsonl rows merged by step (eval and cost keys of one step may sit in separate rows)."""
    steps: dict[int, dict] = defaultdict(dict)
    for row in run.history:
        steps[int(row["step"])].update(row)
    return dict(sorted(steps.items()))


def has_costs(run: Run, at: str) -> bool:
    key = AXES[at][0]
    return any(is_number(row.get(key)) for row in run.history)


def _cost(step: int, row: dict, key: str) -> float | None:
    value = row.get(key)
    if is_number(value):
        return float(value)
    return 0.0 if step == 0 else None  # before training nothing was spent


def curve(run: Run, at: str, metric: str) -> list[tuple[float, float]]:
    """(cost, value) at each evaluation of `metric` that has a cost, in step order."""
    key, name = AXES[at][0], EVAL_PREFIX + metric
    points = []
    for step, row in merged_history(run).items():
        cost = _cost(step, row, key)
        if is_number(row.get(name)) and cost is not None:
            points.append((cost, float(row[name])))
    return points


def reached(run: Run, at: str) -> float | None:
    """The cost of the run's last evaluation (of any metric): how far along its curve can be read."""
    key = AXES[at][0]
    costs = [_cost(step, row, key) for step, row in merged_history(run).items()
             if any(k.startswith(EVAL_PREFIX) and is_number(v) for k, v in row.items())]
    costs = [c for c in costs if c is not None]
    return max(costs) if costs else None


def interpolate(points: list[tuple[float, float]], budget: float) -> float | None:
    """The value at `budget` on a curve of (cumulative cost, value) points in step order: linear between the two
    points that bracket it, the point itself where one sits exactly at it (the last of several at the same cost);
    None when the curve ends below the budget or starts above it."""
    for i, (cost, value) in enumerate(points):
        if cost == budget and (i + 1 == len(points) or points[i + 1][0] > budget):
            return value
        if cost > budget:
            if i == 0:
                return None
            cost_before, value_before = points[i - 1]
            return value_before + (value - value_before) * (budget - cost_before) / (cost - cost_before)
    return None


@dataclass
class Reading:
    """One finished run at the budget: its value, or why it has none."""

    value: float | None
    why: str | None = None
    last_cost: float | None = None  # where its curve ends (for "does not reach")


def reading(run: Run, at: str, metric: str, budget: float) -> Reading:
    if not has_costs(run, at):
        return Reading(None, NO_COSTS)
    points = curve(run, at, metric)
    if not points:
        return Reading(None, NOT_EVALUATED)
    value = interpolate(points, budget)
    if value is not None:
        return Reading(value)
    last = points[-1][0]
    return Reading(None, NOT_REACHED if last < budget else NONE_BEFORE, last)


def _ends(runs: list[Run], at: str) -> list[float]:
    ends = [reached(run, at) for run in runs if run.status == "completed" and has_costs(run, at)]
    return [end for end in ends if end is not None]


def default_budget(runs: list[Run], at: str) -> float:
    """The largest budget every finished run with cost records reached: the least of their last evaluations' costs."""
    ends = _ends(runs, at)
    if not ends:
        raise CompareError(f"no finished run has {AXES[at][0]} in metrics.jsonl, so none can be compared at equal "
                           f"{at}; compare at equal steps without --at")
    if min(ends) <= 0:
        raise CompareError(f"a finished run has no evaluation after step 0 with {AXES[at][0]}; give --budget")
    return min(ends)


def history_metrics(runs: list[Run]) -> set[str]:
    """The metrics finished runs evaluated during training (eval/<metric> keys of metrics.jsonl)."""
    return {key[len(EVAL_PREFIX):] for run in runs if run.status == "completed" for row in run.history
            for key, value in row.items() if key.startswith(EVAL_PREFIX) and is_number(value)}


def check_budget_metrics(metrics: list[str], runs: list[Run]) -> None:
    """Each metric must be one the finished runs evaluated: in their summaries or along their curves."""
    known = available_metrics(runs) + sorted(history_metrics(runs) - set(available_metrics(runs)))
    unknown = [metric for metric in metrics if metric not in known]
    if known and unknown:  # with no finished run there is nothing to check against; cells show the failures
        raise CompareError(f"unknown metric '{unknown[0]}'; runs have: {', '.join(known)}")


# ------------------------------------------------------------------------------------- the comparison


@dataclass
class BudgetComparison:
    """Every method at one budget of one cost axis, for each compared metric."""

    at: str
    budget: float
    given: bool  # --budget, or the largest every run reached
    metrics: list[str]
    rows: list[MethodSummary]

    note = INTERPOLATION_NOTE

    @property
    def text(self) -> str:
        return budget_text(self.at, self.budget)

    def readings(self, row: MethodSummary, metric: str) -> list[Reading]:
        return [reading(run, self.at, metric, self.budget) for run in row.completed]

    def stat(self, row: MethodSummary, metric: str) -> Stat | None:
        values = [r.value for r in self.readings(row, metric) if r.value is not None]
        return Stat(values) if values else None

    def value_text(self, row: MethodSummary, metric: str, with_n: bool = True) -> str:
        """mean ± std (n=2, 1 does not reach) of the seeds that reached the budget, or why there is none."""
        if not row.completed:
            return row.problem_text()
        readings = self.readings(row, metric)
        values = [r.value for r in readings if r.value is not None]
        why = [r.why for r in readings if r.value is None]
        if not values:
            if NOT_REACHED in why:
                last = max(r.last_cost for r in readings if r.why == NOT_REACHED)
                return f"does not reach {self.text} (last evaluation at {number_text(last)})"
            return NO_COSTS if NO_COSTS in why else f"no evaluation at or before {self.text}" if NONE_BEFORE in why \
                else "n/a"
        stat = Stat(values)
        counts = [f"n={stat.n}"] * (with_n and stat.n > 1)
        counts += [f"{why.count(reason)} {reason}" for reason in dict.fromkeys(why)]
        counts += row._unfinished_counts()
        return stat.text(with_n=False) + (f" ({', '.join(counts)})" if counts else "")

    def title(self, metric: str) -> str:
        chosen = "given by --budget" if self.given else "the largest budget every cell reached"
        return f"{metric} at {self.text} ({chosen}; mean ± std across seeds, interpolated between evaluations)"

    def table(self, metric: str) -> TableData:
        return matrix_table(self.rows, metric, title=self.title(metric),
                            value_text=lambda row: self.value_text(row, metric))

    def tables(self) -> list[TableData]:
        return [self.table(metric) for metric in self.metrics]

    # results.csv: the budget and each run's value at it, beside the run's other columns
    def csv_columns(self) -> list[str]:
        return [f"budget_{self.at}", *(f"{metric}_at_budget" for metric in self.metrics)]

    def csv_values(self, run: Run) -> dict:
        values: dict = {f"budget_{self.at}": self.budget}
        for metric in self.metrics:
            values[f"{metric}_at_budget"] = reading(run, self.at, metric, self.budget).value \
                if run.status == "completed" else None
        return values

    def method_curves(self, metric: str) -> dict[str, tuple[list[float], list[float]]]:
        """Per method: (costs, values) at each evaluated step, the mean across finished seeds with costs."""
        curves = {}
        for row in self.rows:
            by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
            for run in row.completed:
                if not has_costs(run, self.at):
                    continue
                key, name = AXES[self.at][0], EVAL_PREFIX + metric
                for step, line in merged_history(run).items():
                    cost = _cost(step, line, key)
                    if cost is not None and is_number(line.get(name)):
                        by_step[step].append((cost, float(line[name])))
            if by_step:
                points = [by_step[step] for step in sorted(by_step)]
                curves[row.label] = ([_mean(c for c, _ in p) for p in points], [_mean(v for _, v in p) for p in points])
        return curves

    def final_points(self, metric: str) -> dict[str, tuple[float, float]]:
        """Per method: (total cost, quality after training), each the mean across finished seeds with costs."""
        finals = {}
        for row in self.rows:
            ends = [points[-1] for run in row.completed if has_costs(run, self.at)
                    for points in [curve(run, self.at, metric)] if points]
            if ends:
                finals[row.label] = (_mean(c for c, _ in ends), _mean(v for _, v in ends))
        return finals


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def compare_at_budget(runs: list[Run], rows: list[MethodSummary], metrics: list[str], at: str,
                      budget: float | None) -> BudgetComparison:
    if at not in AXES:
        raise CompareError(f"--at {at}: choose one of {', '.join(AXES)}")
    if budget is not None and not (is_number(budget) and budget > 0):
        raise CompareError(f"--budget {budget}: give a positive number, e.g. 1e12")
    given = budget is not None
    if budget is None:
        budget = default_budget(runs, at)
    else:
        ends = _ends(runs, at) or [default_budget(runs, at)]  # none: default_budget says why
        if max(ends) < budget:
            raise CompareError(f"no run reaches {budget_text(at, budget)}; the furthest reached "
                               f"{budget_text(at, max(ends))} (give a smaller --budget, or none for the largest "
                               "every cell reached)")
    return BudgetComparison(at=at, budget=budget, given=given, metrics=metrics, rows=rows)


# ------------------------------------------------------------------------------------------ Pareto


def pareto_front(points: dict[str, tuple[float, float]], better: str = "higher") -> list[str]:
    """The names of the non-dominated (cost, quality) points, cheapest first: no other point costs at most as
    much and is at least as good, and strictly cheaper or strictly better."""
    sign = 1.0 if better == "higher" else -1.0

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        (cost_a, quality_a), (cost_b, quality_b) = a, b
        return cost_a <= cost_b and sign * quality_a >= sign * quality_b and (cost_a < cost_b or quality_a != quality_b)

    front = [name for name, point in points.items()
             if not any(dominates(other, point) for key, other in points.items() if key != name)]
    return sorted(front, key=lambda name: points[name][0])


def write_pareto(comparison: BudgetComparison, metric: str, out_dir: Path, colors: dict) -> Path | None:
    """pareto_<metric>_<at>.png: each method's curve and final point, the frontier ringed, the budget a line;
    None when no method has a curve with costs."""
    from kltd.report import plots

    finals = comparison.final_points(metric)
    if not finals:
        return None
    better = better_direction(metric)
    front = pareto_front(finals, better) if better else []
    return plots.pareto(out_dir / f"pareto_{file_stem(metric)}_{comparison.at}.png", metric=metric,
                        axis=AXES[comparison.at][2], curves=comparison.method_curves(metric), finals=finals,
                        front=front, colors=colors, budget=comparison.budget, budget_label=comparison.text,
                        better=better)
