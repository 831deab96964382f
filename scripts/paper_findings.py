"""Check the paper's qualitative findings on the built-in task, with kltd's own commands.

    python scripts/paper_findings.py                 # writes docs/results.md and docs/results/*.png
    python scripts/paper_findings.py --seeds 0 1 --out /tmp/findings --doc /tmp/results.md   # a smaller try
    python scripts/paper_findings.py --out /tmp/markov --doc /tmp/markov.md data=markov     # the Markov task

Overrides after the options go to every run (`data=markov` runs the Markov task, whose runs carry exact figures:
the report then adds a table of every contrast in them, difference against seed spread).

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

    figures = args.doc.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    for path in result.files:
        if path.suffix == ".png":
            shutil.copy(path, figures / path.name)
    table = (args.out / "compare" / "results.md").read_text()
    table = table.replace("](", "](results/") if args.doc.name == "results.md" else table
    seeds = [] if args.seeds == [0, 1, 2] else ["--seeds", *map(str, args.seeds)]
    command = " ".join(["python scripts/paper_findings.py", *seeds, *args.overrides])
    doc = [
        "# The paper's findings on kltd's built-in task",
        "",
        f"Produced by `{command.strip()}` in {minutes:.1f} minutes on this machine "
        f"({os.cpu_count()} CPU cores), seeds {', '.join(map(str, args.seeds))}, equal steps for every run "
        "(the default budget). Numbers are held-out evaluations after training (mean ± std across seeds).",
        "",
        "## Verdicts",
        "",
        *verdicts(rows),
        "",
        ("" if exact else "A correct response's length is fixed by its prompt on this task (one step per term), so "
         "answer length can only move through mistakes; the length half of (b) has little room to show here. ")
        + "\"Within the seed spread\" means the two means differ by less than the sum of their standard "
        "deviations across seeds.",
        "",
        *(["## Every contrast in the exact figures", "",
            "Difference of the means (first method minus second) ± the seed spread (the two methods' standard "
            "deviations across seeds added), and in bold |difference| / spread: above 1 the contrast is resolved "
            "by the seeds, below 1 it is not.", "", *contrast_table(rows, exact), ""] if exact else []),
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
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(doc) + "\n")
    print("\n".join(verdicts(rows)))
    print(f"wrote {args.doc} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
