"""Check the paper's qualitative findings on the built-in tasks, with kltd's own commands.

    python scripts/paper_findings.py                 # the Markov task (the default): its section of docs/results.md
    python scripts/paper_findings.py data=addition   # the addition task: docs/results.md's top and docs/results/*.png
    python scripts/paper_findings.py --seeds 0 1 --out /tmp/findings --doc /tmp/results.md   # a smaller try

Overrides after the options go to every run. The Markov task (`data=markov`, the default) carries exact figures:
its report is one section, "The Markov task" (per-cell exact figures, every contrast in them with its seed spread),
written into --doc between the markers `<!-- markov-findings:start -->` and `<!-- markov-findings:end -->` (at the
end of the page when it has none); the rest of the page is kept. The addition task's report (every other run)
replaces the page's top, up to its first section marker (`<!-- NAME:start -->`), and keeps everything from there
on (the Markov section, and the sections scripts/paper_table.py and scripts/paper_methods.py write), so neither
run erases the other.

Runs, at equal steps (the default budget) and for every seed:
  - teacher vs student prefixes x forward KL, reverse KL and a 50/50 KL mix (`divergence=forward_kl,reverse_kl,kl_mix`);
  - SFT (fixed prefix, forward KL), for the exposure-bias picture next to DAgger and OPD.
Then `kltd compare` over both sweeps, and a verdict on each finding:
  (a) student states beat teacher states (held-out accuracy, same divergence);
  (b) reverse KL gives lower student entropy and shorter answers than forward KL (same prefix);
  (c) the KL mix sits between forward and reverse KL (accuracy, entropy, length).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kltd.report.compare import compare

METRICS = ["accuracy", "reverse_kl_student_states", "forward_kl_teacher_states", "student_entropy", "response_length"]
# data=markov's exact figures (no sampling noise: two runs differ in them only by what training did)
EXACT = ["exact_reverse_kl", "exact_forward_kl", "exact_accepted", "exact_response_length",
         "exact_student_entropy_rate"]
KL_LABELS = {  # prefix -> divergence -> method label that kltd derives for that run
    "teacher": {"forward": "SeqKD", "reverse": "Teacher-prefix RKL", "mix": "SeqKD [kl_mix(0.5)]"},
    "student": {"forward": "DAgger", "reverse": "OPD", "mix": "DAgger [kl_mix(0.5)]"},
}


def kltd_train(*overrides: str) -> None:
    cmd = [sys.executable, "-m", "kltd.app.cli", "train", "-m", *overrides, "trainer.progress=false"]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")},
                   stdout=subprocess.DEVNULL)


def stats_by_label(result) -> dict:
    return {row.label: row for row in result.rows}


def mean(rows: dict, label: str, metric: str) -> float:
    stat = rows[label].after(metric)
    return stat.mean


def spread(rows: dict, label: str, metric: str) -> float:
    stat = rows[label].after(metric)
    return stat.std or 0.0


def compared(rows: dict, a: str, b: str, metric: str) -> tuple[float, float, bool]:
    """Means of two methods and whether they differ by more than their seed spreads added."""
    mean_a, mean_b = mean(rows, a, metric), mean(rows, b, metric)
    return mean_a, mean_b, abs(mean_a - mean_b) > spread(rows, a, metric) + spread(rows, b, metric)


def verdict(outcomes: list[tuple[bool, bool]]) -> str:
    """outcomes: (the finding's direction holds, the difference exceeds the seed spread) per comparison."""
    if all(ok and clear for ok, clear in outcomes):
        return "holds"
    if all(ok for ok, _ in outcomes):
        return "holds in direction, but not every difference exceeds the seed spread"
    if not any(ok for ok, _ in outcomes):
        return "does not hold"
    return "mixed: it holds in some comparisons and not in others"


def spread_note(clear: bool) -> str:
    return "beyond the seed spread" if clear else "within the seed spread"


def verdicts(rows: dict) -> list[str]:
    lines, outcomes = [], []
    for kl in ("forward", "reverse", "mix"):  # (a) student vs teacher states, same divergence
        s, t, clear = compared(rows, KL_LABELS["student"][kl], KL_LABELS["teacher"][kl], "accuracy")
        outcomes.append((s > t, clear))
        lines.append(f"  - {kl} KL: student states {s:.3f} vs teacher states {t:.3f} ({spread_note(clear)})")
    lines.insert(0, f"- **(a) student states beat teacher states at equal steps: {verdict(outcomes)}** "
                    "(held-out greedy accuracy)")
    for metric, what in (("student_entropy", "lower entropy"), ("response_length", "shorter answers")):
        outcomes, detail = [], []
        for prefix in ("teacher", "student"):  # (b) reverse vs forward KL, same states
            r, f, clear = compared(rows, KL_LABELS[prefix]["reverse"], KL_LABELS[prefix]["forward"], metric)
            outcomes.append((r < f, clear))
            detail.append(f"  - {prefix} states: {metric} {r:.4g} (reverse) vs {f:.4g} (forward), {spread_note(clear)}")
        lines += [f"- **(b) reverse KL gives {what} than forward KL: {verdict(outcomes)}**", *detail]
    out_c, ok_c = [], []
    for prefix in ("teacher", "student"):  # (c) the mix between forward and reverse
        labels = KL_LABELS[prefix]
        for metric in ("accuracy", "student_entropy", "response_length"):
            f, r, m = (mean(rows, labels[k], metric) for k in ("forward", "reverse", "mix"))
            between = min(f, r) <= m <= max(f, r)
            ok_c.append(between)
            out_c.append(f"  - {prefix} states, {metric}: forward {f:.4g}, mix {m:.4g}, reverse {r:.4g}"
                         f" ({'between' if between else 'outside'})")
    head = "holds" if all(ok_c) else ("does not hold" if not any(ok_c) else "holds partly")
    lines += [f"- **(c) the KL mix sits between forward and reverse KL: {head}** "
              f"({sum(ok_c)} of {len(ok_c)} comparisons)", *out_c]
    return lines


def contrasts() -> list[tuple[str, str, str]]:
    """(what, a, b) for every comparison the paper makes, a - b: student vs teacher states under each divergence,
    reverse vs forward KL at each prefix, the KL mix against each of its ends at each prefix."""
    pairs = [(f"student - teacher states, {kl} KL", KL_LABELS["student"][kl], KL_LABELS["teacher"][kl])
             for kl in ("forward", "reverse", "mix")]
    pairs += [(f"reverse - forward KL, {prefix} states", KL_LABELS[prefix]["reverse"], KL_LABELS[prefix]["forward"])
              for prefix in ("teacher", "student")]
    pairs += [(f"mix - {end} KL, {prefix} states", KL_LABELS[prefix]["mix"], KL_LABELS[prefix][end])
              for prefix in ("teacher", "student") for end in ("forward", "reverse")]
    return pairs


def contrast_table(rows: dict, metrics: list[str]) -> list[str]:
    """Markdown: per contrast and metric, the difference of the means a - b, the seed spread (the two cells' standard
    deviations across seeds added, the verdicts' criterion) and |difference| / spread."""
    lines = ["| contrast | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for what, a, b in contrasts():
        cells = []
        for metric in metrics:
            difference = mean(rows, a, metric) - mean(rows, b, metric)
            width = spread(rows, a, metric) + spread(rows, b, metric)
            ratio = f"{abs(difference) / width:.1f}" if width else "inf"
            cells.append(f"{difference:+.3g} ± {width:.2g} (**{ratio}**)")
        lines.append(f"| {what} ({a} vs {b}) | " + " | ".join(cells) + " |")
    return lines


MARKOV_START, MARKOV_END = "<!-- markov-findings:start -->", "<!-- markov-findings:end -->"
# the cells of the study in the order of its table: SFT, then teacher states, then student states
CELLS = ["SFT", *(KL_LABELS[prefix][kl] for prefix in ("teacher", "student") for kl in ("forward", "reverse", "mix"))]
FIRST_MARKER = re.compile(r"^<!-- [\w-]+:start -->$", re.M)


def cell_table(rows: dict, metrics: list[str]) -> list[str]:
    """Markdown: the student before training (the mean over every run's evaluation before training: one student,
    so one value) and per cell the mean ± std across seeds of each exact figure after training."""
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    before = []
    for metric in metrics:
        values = [run.eval_before[metric] for row in rows.values() for run in row.completed
                  if metric in (run.eval_before or {})]
        before.append(f"{sum(values) / len(values):.3g}" if values else "n/a")
    lines.append("| the student before training | " + " | ".join(before) + " |")
    for label in CELLS:
        cells = []
        for metric in metrics:
            stat = rows[label].after(metric)
            cells.append(f"{stat.mean:.3g} ± {stat.std or 0:.2g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def resolved_lists(rows: dict, metrics: list[str]) -> list[str]:
    """Per contrast, the figures the seeds resolve (|difference| > spread) and those they do not."""
    lines = []
    for what, a, b in contrasts():
        yes, no = [], []
        for metric in metrics:
            difference = mean(rows, a, metric) - mean(rows, b, metric)
            width = spread(rows, a, metric) + spread(rows, b, metric)
            (yes if abs(difference) > width else no).append(f"{metric} {difference:+.3g}")
        lines.append(f"- {what}: resolved {len(yes)} of {len(metrics)}"
                     + (f" ({', '.join(yes)})" if yes else "") + (f"; not resolved: {', '.join(no)}" if no else ""))
    return lines


def markov_section(args, result, minutes: float, exact: list[str], command: str) -> str:
    """The Markov task's section, between its markers."""
    rows = stats_by_label(result)
    teacher = [run.eval_before.get("exact_teacher_entropy_rate") for row in rows.values() for run in row.completed
               if (run.eval_before or {}).get("exact_teacher_entropy_rate") is not None]
    steps = sorted({run.summary.get("steps") for row in rows.values() for run in row.completed})
    doc = [
        MARKOV_START,
        "## The Markov task",
        "",
        f"Produced by `{command}` in {minutes:.1f} minutes on this machine ({os.cpu_count()} CPU cores): the Markov "
        "task (`data=markov`, [README.md's section](../README.md#the-markov-task-exact-figures)), teacher and student "
        "states x forward KL, reverse KL and the 50/50 KL mix, plus SFT, seeds "
        f"{', '.join(map(str, args.seeds))}, {'/'.join(map(str, steps))} steps each. Every figure is one of the "
        "evaluation's exact ones (no sampling noise: seeds differ in them only through training).",
        "",
        *([f"The teacher's entropy rate is {sum(teacher) / len(teacher):.3g} nats per token."] if teacher else []),
        "Per cell, mean ± std across the seeds:",
        "",
        *cell_table(rows, exact),
        "",
        "Every contrast the paper makes: the difference of the means (first method minus second) ± the seed spread "
        "(the two cells' standard deviations across seeds added: the verdicts' criterion), and in bold "
        "|difference| / spread: above 1 the seeds resolve the contrast, below 1 they do not.",
        "",
        *contrast_table(rows, exact),
        "",
        "Resolved (|difference| > seed spread) per contrast:",
        "",
        *resolved_lists(rows, exact),
        "",
        "The greedy accuracy after training, per cell: "
        + ", ".join(f"{label} {mean(rows, label, 'accuracy'):.3f}" for label in CELLS) + ".",
        MARKOV_END,
    ]
    return "\n".join(doc)


def write_section(doc: Path, text: str, start: str, end: str) -> None:
    """`text` (from `start` to `end`) into the page `doc` in place of the section between those markers, else at
    its end (a new page when there is none)."""
    page = doc.read_text() if doc.exists() else ""
    if start in page and end in page:
        page = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: text, page, flags=re.S)
    else:
        page = (page.rstrip("\n") + "\n\n" if page.strip() else "") + text + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(page)


def write_top(doc: Path, text: str) -> None:
    """`text` in place of the page's top, up to its first section marker; the page from that marker on is kept."""
    page = doc.read_text() if doc.exists() else ""
    marker = FIRST_MARKER.search(page)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n" + ("\n" + page[marker.start():] if marker else ""))


def exposure_bias(result) -> list[str]:
    """Per-position divergence on student states: early vs late positions, for SFT, DAgger and OPD."""
    lines = []
    for label in ("SFT", "DAgger", "OPD"):
        curves = [run.eval_after.get("divergence_by_position", {}).get("student_states") for run in result.runs
                  if run.label == label and run.status == "completed"]
        curves = [c for c in curves if c]
        if not curves:
            continue
        width = min(len(c) for c in curves)
        third = max(1, width // 3)
        early = sum(sum(c[:third]) / third for c in curves) / len(curves)
        late = sum(sum(c[width - third : width]) / third for c in curves) / len(curves)
        lines.append(f"  - {label}: mean reverse KL per token on its own samples, first third of the response "
                     f"{early:.4f}, last third {late:.4f} (x{late / early if early else float('nan'):.2f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/findings"))
    parser.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from the runs already in --out (no training)")
    parser.add_argument("--minutes", type=float, help="with --report-only: the training time to report")
    parser.add_argument("overrides", nargs="*", help="extra kltd train overrides (applied to every run)")
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = "seed=" + ",".join(map(str, args.seeds))
    if not args.report_only:
        run_sweeps(args, seeds)
    from kltd.report.aggregate import available_metrics
    from kltd.report.records import load_runs

    sweeps = [args.out / "paper", args.out / "sft"]
    metrics = METRICS + [m for m in EXACT if m in available_metrics(load_runs(sweeps))]
    result = compare(sweeps, args.out / "compare", metrics)
    minutes = args.minutes if args.report_only and args.minutes else (time.perf_counter() - started) / 60
    write_report(args, result, minutes, [m for m in metrics if m in EXACT])


def run_sweeps(args, seeds: str) -> None:
    shutil.rmtree(args.out, ignore_errors=True)
    kltd_train("prefix=teacher,student", "divergence=forward_kl,reverse_kl,kl_mix", seeds, f"hydra.sweep.dir={args.out}/paper",
               *args.overrides)
    kltd_train("prefix=fixed", "trajectory=expert", seeds, f"hydra.sweep.dir={args.out}/sft", *args.overrides)


def write_report(args, result, minutes: float, exact: list[str]) -> None:
    rows = stats_by_label(result)
    seeds = [] if args.seeds == [0, 1, 2] else ["--seeds", *map(str, args.seeds)]
    command = " ".join(["python scripts/paper_findings.py", *seeds, *args.overrides]).strip()
    if exact:  # the Markov task: its own section, the rest of the page (and docs/results/*.png) untouched
        write_section(args.doc, markov_section(args, result, minutes, exact, command), MARKOV_START, MARKOV_END)
        print("\n".join(resolved_lists(rows, exact)))
        print(f"wrote the Markov section into {args.doc} ({minutes:.1f} min)")
        return
    figures = args.doc.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    for path in result.files:
        if path.suffix == ".png":
            shutil.copy(path, figures / path.name)
    table = (args.out / "compare" / "results.md").read_text()
    table = table.replace("](", "](results/") if args.doc.name == "results.md" else table
    doc = [
        "# The paper's findings on kltd's built-in task",
        "",
        f"Produced by `{command}` in {minutes:.1f} minutes on this machine "
        f"({os.cpu_count()} CPU cores), seeds {', '.join(map(str, args.seeds))}, equal steps for every run "
        "(the default budget). Numbers are held-out evaluations after training (mean ± std across seeds).",
        "",
        "## Verdicts",
        "",
        *verdicts(rows),
        "",
        "A correct response's length is fixed by its prompt on this task (one step per term), so "
        "answer length can only move through mistakes; the length half of (b) has little room to show here. "
        "\"Within the seed spread\" means the two means differ by less than the sum of their standard "
        "deviations across seeds.",
        "",
        "## Exposure bias",
        "",
        "Per-position divergence on student states (solid) and teacher states (dashed), every method, after "
        "training. Measured on the student's own samples:",
        "",
        *exposure_bias(result),
        "",
        "![per-position divergence](results/divergence_by_position.png)",
        "",
        "## Tables and plots from `kltd compare`",
        "",
        table,
    ]
    write_top(args.doc, "\n".join(doc))
    print("\n".join(verdicts(rows)))
    print(f"wrote {args.doc} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
