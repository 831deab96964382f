"""Paired differences between methods: `kltd compare --against LABEL`.

Every method is evaluated on the same questions with the same seed (kltd.train.evaluation), so the difference of
two methods is measured question by question: per question the mean over each method's finished runs, then the
mean difference with a bootstrap interval over questions (kltd.report.bootstrap.paired_interval). Far tighter than
comparing two intervals, because what is hard for one method is hard for the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from kltd.report.aggregate import MethodSummary
from kltd.report.bootstrap import paired_interval
from kltd.report.records import CompareError


@dataclass
class PairedDifference:
    label: str
    metric: str
    difference: float | None  # mean over questions of this method's value minus the reference's
    interval: tuple[float, float] | None
    problem: str | None = None  # why there is no difference: no per-question values, other questions


def per_question(row: MethodSummary, metric: str) -> list[float] | None:
    """Per question, the mean of `metric` over the method's finished runs (None: no run kept them)."""
    lists = []
    for run in row.completed:
        block = run.eval_after
        name, _, key = metric.rpartition("/")
        figures = (block.get("sets") or {}).get(name or block.get("set", ""), {})
        values = (figures.get("per_question") or {}).get(key)
        if values:
            lists.append(values)
    if not lists or len({len(v) for v in lists}) > 1:
        return None
    return [sum(column) / len(column) for column in zip(*lists)]


def paired_differences(rows: list[MethodSummary], metrics: list[str], against: str) -> list[PairedDifference]:
    """Each other method's difference from the method labelled `against`, per metric."""
    labels = [row.label for row in rows]
    if against not in labels:
        raise CompareError(f"--against '{against}' is not a method here; methods: {', '.join(labels)}")
    reference = next(row for row in rows if row.label == against)
    out = []
    for metric in metrics:
        base = per_question(reference, metric)
        for row in rows:
            if row is reference:
                continue
            values = per_question(row, metric)
            if base is None or values is None:
                out.append(PairedDifference(row.label, metric, None, None, "no per-question values"))
            elif len(values) != len(base):
                out.append(PairedDifference(row.label, metric, None, None,
                                            f"other questions ({len(values)} against {len(base)})"))
            else:
                diff = sum(a - b for a, b in zip(values, base)) / len(base)
                out.append(PairedDifference(row.label, metric, diff, paired_interval(values, base)))
    return out
