"""The paper's Table 1 at toy scale: a `sweep=paper` sweep read at equal steps and at equal FLOPs.

    kltd train sweep=paper hydra.sweep.dir=outputs/multirun/paper-toy
    python scripts/paper_table.py outputs/multirun/paper-toy                   # prints the section
    python scripts/paper_table.py outputs/multirun/paper-toy --doc docs/results.md   # writes it into the page

Rows are prefix x divergence x horizon, columns the paper's Avg@k, Pass@k and mean response length, each with
its 95% bootstrap interval over questions (after training, i.e. at equal steps), then the same figures read
at the largest FLOP budget every cell reached (kltd.report.budget: linear between the evaluations around it).
The verdicts compare student and teacher prefixes for each divergence and horizon: a difference counts when
the paired interval over the same questions (kltd.report.bootstrap.paired_interval) leaves out 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from kltd.report.aggregate import summarize
from kltd.report.bootstrap import paired_interval
from kltd.report.budget import budget_text, default_budget, reading
from kltd.report.records import load_runs

START, END = "<!-- paper-table:start -->", "<!-- paper-table:end -->"
METRICS = ("avg_at_k", "pass_at_k", "response_length")


def cell_key(run) -> tuple[str, str, int]:
    c = run.config
    return run.prefix, c["loss"]["divergence"], c["sampling"]["max_new_tokens"]


def _interval_text(value: float, span) -> str:
    return f"{value:.3f} [{span[0]:.3f}, {span[1]:.3f}]" if span else f"{value:.3f}"


def section(sweep: Path) -> str:
    runs = [run for run in load_runs([sweep]) if run.status == "completed"]
    if not runs:
        sys.exit(f"no finished runs under {sweep}")
    summarize(runs)  # labels each run with what sets it apart
    by_cell = {cell_key(run): run for run in runs}
    flops = default_budget(runs, "flops")
    k, n = runs[0].eval_after["pass_k"], runs[0].eval_after["samples"]
    lines = [START, "## The paper's protocol at toy scale (`sweep=paper`)", "",
             f"One seed per cell, {len(runs)} cells: teacher and student prefixes x forward KL, reverse KL and a "
             f"50/50 KL mix x a short (24-token) and a long (64-token) horizon, 200 steps each. Held-out questions: "
             f"{runs[0].eval_after['questions']}, {n} samples each (Avg@{n}, Pass@{k}), evaluated every 50 steps. "
             "Brackets: 95% bootstrap interval over questions.", "",
             "| prefix | divergence | horizon | Avg@k (equal steps) | Pass@k (equal steps) | length | "
             f"Avg@k at {budget_text('flops', flops)} | FLOPs at 200 steps |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(by_cell, key=lambda c: (c[2], c[1], c[0])):
        run = by_cell[key]
        after, spans = run.eval_after, run.eval_after.get("intervals") or {}
        at = reading(run, "flops", "avg_at_k", flops)
        total = (run.summary.get("compute") or {}).get("flops", {}).get("total")
        at_flops = f"{at.value:.3f}" if at.value is not None else "does not reach"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     + " | ".join(_interval_text(after[m], spans.get(m)) for m in METRICS)
                     + f" | {at_flops} | {total:.3g} |")
    horizons = sorted({c[2] for c in by_cell})
    lines += ["", "Student against teacher prefix, same divergence (Avg@k after training, paired over the same "
              "questions; then the difference of the two curves at the FLOP budget above):", ""]
    for divergence in ("forward_kl", "reverse_kl", "kl_mix"):
        for horizon in horizons:
            lines += _verdict(by_cell, ("student", divergence, horizon), ("teacher", divergence, horizon), flops,
                              f"{divergence}, horizon {horizon}: student - teacher", ("student", "teacher"))
    lines += ["", "Reverse against forward KL, same prefix:", ""]
    for prefix in ("student", "teacher"):
        for horizon in horizons:
            lines += _verdict(by_cell, (prefix, "reverse_kl", horizon), (prefix, "forward_kl", horizon), flops,
                              f"{prefix} prefix, horizon {horizon}: reverse - forward", ("reverse", "forward"))
    lines += ["", END]
    return "\n".join(lines)


def _verdict(by_cell: dict, first: tuple, second: tuple, flops: float, what: str, names: tuple[str, str]
             ) -> list[str]:
    """One line: `first` minus `second` after training with its paired interval, and at the FLOP budget."""
    a_run, b_run = by_cell.get(first), by_cell.get(second)
    if not (a_run and b_run):
        return []
    a, b = (run.eval_after["sets"]["heldout"]["per_question"]["avg_at_k"] for run in (a_run, b_run))
    diff = sum(a) / len(a) - sum(b) / len(b)
    low, high = paired_interval(a, b)
    verdict = f"{names[0]} ahead" if low > 0 else f"{names[1]} ahead" if high < 0 else "no difference the interval shows"
    at = [reading(run, "flops", "avg_at_k", flops).value for run in (a_run, b_run)]
    equal = f"{at[0] - at[1]:+.3f}" if None not in at else "not read"
    return [f"- {what}: {diff:+.3f} [{low:+.3f}, {high:+.3f}], {verdict}; at equal FLOPs {equal}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--doc", type=Path, help="write the section into this page (between its markers, else at "
                                                   "the end)")
    args = parser.parse_args()
    text = section(args.sweep)
    if not args.doc:
        print(text)
        return
    write_section(args.doc, text, START, END)


def write_section(doc: Path, text: str, start: str, end: str) -> None:
    """`text` (which begins with `start` and ends with `end`) into the page `doc`: in place of the section between
    those markers, else at the end."""
    page = doc.read_text()
    if start in page:
        page = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: text, page, flags=re.S)
    else:
        page = page.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(page)
    print(f"wrote the section into {doc}")


if __name__ == "__main__":
    main()
