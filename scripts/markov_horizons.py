"""Exposure bias on the Markov task: teacher against student states (SeqKD vs DAgger, forward KL) at a short, the
shipped and a long horizon.

    python scripts/markov_horizons.py                       # horizons 4, 7, 16, seeds 0 1 2; writes docs/results.md
    python scripts/markov_horizons.py --horizons 3 5 --seeds 0 --out /tmp/h --doc /tmp/h.md trainer.max_steps=20

Per horizon, one sweep `kltd train -m data=markov data.markov.horizon=H prefix=teacher,student seed=...` (the
token budgets follow the horizon). Above 131,072 sequences per start state ((states + 1)^(horizon - 1)) the exact
figures are off and the evaluation's sampled figures are the measure, so the table reports the sampled ones at
every horizon (the same measure throughout), with the exact ones beside them where the horizon allows:

  - avg_at_k: the share of the student's samples the chain accepts (every transition allowed, <eos> in time);
  - reverse_kl_student_states: KL(q||p) of whole responses, the exact per-token KLs summed over the student's own
    samples (an unbiased estimate of exact_reverse_kl);
  - forward_kl_teacher_states: KL(p||q), the same over the teacher's samples;
  - truncated: the share of the student's samples the horizon cuts.

A run's measurement error is its 95% bootstrap interval over the held-out questions (metrics.json `intervals`); the
table gives the median half-width over the runs of a cell beside the seed spread. The section goes into --doc
between `<!-- markov-horizons:start -->` and `<!-- markov-horizons:end -->` (at the end when it has none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_findings import write_section  # noqa: E402

START, END = "<!-- markov-horizons:start -->", "<!-- markov-horizons:end -->"
SAMPLED = ["avg_at_k", "reverse_kl_student_states", "forward_kl_teacher_states", "truncated"]
EXACT = {"avg_at_k": "exact_accepted", "reverse_kl_student_states": "exact_reverse_kl",
         "forward_kl_teacher_states": "exact_forward_kl", "truncated": "exact_truncated"}
METHODS = ("SeqKD", "DAgger")  # teacher states, student states; forward KL both


def run_sweeps(args) -> None:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    for horizon in args.horizons:
        cmd = [sys.executable, "-m", "kltd.app.cli", "train", "-m", "data=markov", f"data.markov.horizon={horizon}",
               "prefix=teacher,student", "seed=" + ",".join(map(str, args.seeds)),
               f"hydra.sweep.dir={args.out}/h{horizon}", "trainer.progress=false", *args.overrides]
        print("+", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def load(out: Path, horizons: list[int]) -> dict:
    """horizon -> method -> the eval_after of each completed run."""
    found: dict = {}
    for horizon in horizons:
        for path in sorted((out / f"h{horizon}").glob("*/metrics.json")):
            summary = json.loads(path.read_text())
            if summary.get("status") == "completed" and summary.get("method") in METHODS:
                found.setdefault(horizon, {}).setdefault(summary["method"], []).append(summary["eval_after"])
    return found


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def half_width(evals: list[dict], metric: str) -> float:
    """Median over the runs of half the 95% bootstrap interval of `metric`."""
    widths = [(e["intervals"][metric][1] - e["intervals"][metric][0]) / 2 for e in evals
              if metric in e.get("intervals", {})]
    return statistics.median(widths) if widths else float("nan")


def section(found: dict, command: str, minutes: float) -> str:
    horizons = sorted(found)
    lines = [START, "## The Markov task: teacher against student states as the horizon grows", "",
             f"Produced by `{command}` in {minutes:.1f} minutes ({os.cpu_count()} CPU cores). SeqKD (teacher states) "
             "and DAgger (student states), both forward KL, on the shipped chain at horizons "
             f"{', '.join(map(str, horizons))}. Per cell the mean ± std across seeds of the sampled figures "
             "(the same measure at every horizon), [the median half-width of a run's 95% bootstrap interval over "
             "questions], and the exact figure's mean where the horizon allows it (n/a: above 131,072 sequences "
             "per start state).", "",
             "| horizon | method | seeds | " + " | ".join(SAMPLED) + " |", "|---|---|---|" + "---|" * len(SAMPLED)]
    for horizon in horizons:
        for method in METHODS:
            evals = found[horizon].get(method, [])
            if not evals:
                continue
            cells = []
            for metric in SAMPLED:
                m, s = mean_std([e[metric] for e in evals])
                exact = [e[EXACT[metric]] for e in evals if EXACT[metric] in e]
                exact_text = f"{statistics.mean(exact):.3g}" if exact else "n/a"
                cells.append(f"{m:.3g} ± {s:.2g} [±{half_width(evals, metric):.2g}] (exact {exact_text})")
            lines.append(f"| {horizon} | {method} | {len(evals)} | " + " | ".join(cells) + " |")
    lines += ["", "DAgger - SeqKD (student minus teacher states) per horizon: the difference of the means ± the seed "
              "spread (the two cells' stds added), and in bold |difference| / spread:", "",
              "| horizon | " + " | ".join(SAMPLED) + " |", "|---|" + "---|" * len(SAMPLED)]
    for horizon in horizons:
        cells = []
        if not all(found[horizon].get(m) for m in METHODS):
            continue
        for metric in SAMPLED:
            (a, sa), (b, sb) = (mean_std([e[metric] for e in found[horizon][m]]) for m in ("DAgger", "SeqKD"))
            width = sa + sb
            ratio = abs(a - b) / width if width else (float("inf") if a != b else 0.0)
            cells.append(f"{a - b:+.3g} ± {width:.2g} (**{ratio:.1f}**)")
        lines.append(f"| {horizon} | " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[4, 7, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/markov_horizons"))
    parser.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the runs in --out")
    parser.add_argument("--minutes", type=float, help="with --report-only: the time to report")
    parser.add_argument("overrides", nargs="*", help="extra kltd train overrides (applied to every run)")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.report_only:
        run_sweeps(args)
    found = load(args.out, args.horizons)
    if not found:
        raise SystemExit(f"markov_horizons: no completed SeqKD or DAgger run under {args.out}/h*")
    options = ([] if args.horizons == [4, 7, 16] else ["--horizons", *map(str, args.horizons)]) + \
        ([] if args.seeds == [0, 1, 2] else ["--seeds", *map(str, args.seeds)])
    command = " ".join(["python scripts/markov_horizons.py", *options, *args.overrides])
    minutes = args.minutes if args.report_only and args.minutes else (time.perf_counter() - started) / 60
    write_section(args.doc, section(found, command, minutes), START, END)
    print(f"wrote the section into {args.doc} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
