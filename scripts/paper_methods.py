"""The paper's two methods and its RL half at toy scale: GRPO after each objective, and the entropy-gated length
curriculum against a fixed horizon, each over seeds.

    kltd train sweep=paper_rl seed=0,1,2 hydra.sweep.dir=outputs/multirun/results-rl
    kltd train -m prefix=student trajectory=student sampling.length_schedule=entropy_gated \\
        'sampling.lengths=[16,32,64]' sampling.entropy_min=0.1 eval.every=50 eval.samples=8 eval.pass_k=4 seed=0,1,2 \\
        hydra.sweep.dir=outputs/multirun/results-curriculum
    kltd train -m prefix=student trajectory=student eval.every=50 eval.samples=8 eval.pass_k=4 seed=0,1,2 \\
        hydra.sweep.dir=outputs/multirun/results-fixed
    python scripts/paper_methods.py outputs/multirun/results-rl outputs/multirun/results-curriculum \\
        outputs/multirun/results-fixed --doc docs/results.md

Figures are held-out evaluations, mean ± std across seeds; a difference is "beyond the seed spread" when the two
means differ by more than the sum of their standard deviations (docs/results.md's rule).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from paper_table import write_section

from kltd.report.records import load_runs

START, END = "<!-- paper-methods:start -->", "<!-- paper-methods:end -->"


def _stat(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _text(values: list[float], places: int = 3) -> str:
    mean, std = _stat(values)
    return f"{mean:.{places}f} ± {std:.{places}f}"


def _compare(a: list[float], b: list[float]) -> str:
    (ma, sa), (mb, sb) = _stat(a), _stat(b)
    return "beyond the seed spread" if abs(ma - mb) > sa + sb else "within the seed spread"


def _completed(sweep: Path) -> list:
    runs = [run for run in load_runs([sweep]) if run.status == "completed"]
    if not runs:
        sys.exit(f"no finished runs under {sweep}")
    return runs


def _by_method(runs: list) -> dict[str, list]:
    methods: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r.seed or 0):
        methods.setdefault(run.method, []).append(run)
    return methods


def rl_section(sweep: Path) -> list[str]:
    methods = _by_method(_completed(sweep))
    metrics = ("avg_at_k", "pass_at_k", "accuracy")
    seeds = sorted({run.seed for runs in methods.values() for run in runs})
    first = next(iter(methods.values()))[0]
    rl = first.config["rl"]
    lines = ["### GRPO after each objective (`sweep=paper_rl`)", "",
             f"Forward KL (DAgger) and reverse KL (OPD) on the student's states for {first.config['trainer']['max_steps']}"
             f" steps, then GRPO for {rl['steps']} steps ({rl['batch_size'] // rl['group_size']} prompts x "
             f"{rl['group_size']} samples a step, rl.lr={rl['lr']:g}, the task's checker as the reward), seeds "
             f"{', '.join(map(str, seeds))}. Held-out: {first.eval_after['questions']} questions, "
             f"{first.eval_after['samples']} samples each.", "",
             "| method | " + " | ".join(f"{m} before RL | {m} after RL" for m in metrics) + " |",
             "|---|" + "---|" * (2 * len(metrics))]
    for method, runs in methods.items():
        cells = [f"{_text([r.eval_before_rl[m] for r in runs])} | {_text([r.eval_after[m] for r in runs])}"
                 for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    if len(methods) == 2:
        (a, a_runs), (b, b_runs) = methods.items()
        for when, read in (("before RL", lambda r: r.eval_before_rl), ("after RL", lambda r: r.eval_after)):
            x, y = [read(r)["avg_at_k"] for r in a_runs], [read(r)["avg_at_k"] for r in b_runs]
            lead = a if _stat(x)[0] > _stat(y)[0] else b
            lines.append(f"- Avg@k {when}: {a} {_stat(x)[0]:.3f}, {b} {_stat(y)[0]:.3f}: {lead} ahead by "
                         f"{abs(_stat(x)[0] - _stat(y)[0]):.3f}, {_compare(x, y)}")
        for method, runs in methods.items():
            gain = [r.eval_after["avg_at_k"] - r.eval_before_rl["avg_at_k"] for r in runs]
            lines.append(f"- what RL changed for {method}: Avg@k {_text(gain, 3)} (per seed: "
                         f"{', '.join(f'{g:+.3f}' for g in gain)})")
    return lines


def curriculum_section(gated_sweep: Path, fixed_sweep: Path) -> list[str]:
    gated, fixed = _completed(gated_sweep), _completed(fixed_sweep)
    horizon = gated[0].summary["horizon"]
    lines = ["### The entropy-gated length curriculum against a fixed horizon", "",
             f"OPD for {gated[0].config['trainer']['max_steps']} steps, evaluated every "
             f"{gated[0].config['eval']['every']} steps; the curriculum grows through {horizon['lengths']} while the "
             f"held-out entropy is at least H_min = {horizon['entropy_min']:g}, the fixed run samples "
             f"{fixed[0].config['sampling']['max_new_tokens']} tokens throughout. Seeds "
             f"{', '.join(str(r.seed) for r in gated)} and {', '.join(str(r.seed) for r in fixed)}.", "",
             "| horizon | Avg@k | Pass@k | accuracy | length | truncated | student tokens sampled in training |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in (("entropy-gated", gated), ("fixed", fixed)):
        cells = [_text([r.eval_after[m] for r in runs]) for m in ("avg_at_k", "pass_at_k", "accuracy")]
        cells += [_text([r.eval_after[m] for r in runs], 2) for m in ("response_length", "truncated")]
        cells.append(_text([r.summary["tokens"]["student_generated"] for r in runs], 0))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The gate's decisions (held-out entropy at each evaluation, and the horizon after it):", ""]
    for run in gated:
        decisions = run.summary["horizon"]["decisions"]
        course = ", ".join(f"step {d['step']}: H={d['entropy']:.4f} -> {d['after']}" for d in decisions)
        lines.append(f"- seed {run.seed}: {course or 'no decision'}; final horizon {run.summary['horizon']['final']}")
    x, y = [r.eval_after["avg_at_k"] for r in gated], [r.eval_after["avg_at_k"] for r in fixed]
    lines += ["", f"- Avg@k, curriculum - fixed: {_stat(x)[0] - _stat(y)[0]:+.3f}, {_compare(x, y)}"]
    t_gated, t_fixed = ([r.summary["tokens"]["student_generated"] for r in runs] for runs in (gated, fixed))
    lines.append(f"- student tokens sampled in training: the curriculum's are {_stat(t_gated)[0] / _stat(t_fixed)[0]:.2f}"
                 " x the fixed horizon's")
    return lines


def section(rl_sweep: Path, gated_sweep: Path, fixed_sweep: Path) -> str:
    lines = [START, "## The paper's methods at toy scale", "", *rl_section(rl_sweep), "",
             *curriculum_section(gated_sweep, fixed_sweep), "", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rl_sweep", type=Path)
    parser.add_argument("gated_sweep", type=Path)
    parser.add_argument("fixed_sweep", type=Path)
    parser.add_argument("--doc", type=Path, help="write the section into this page (between its markers, else at "
                                                   "the end)")
    args = parser.parse_args()
    text = section(args.rl_sweep, args.gated_sweep, args.fixed_sweep)
    if args.doc:
        write_section(args.doc, text, START, END)
    else:
        print(text)


if __name__ == "__main__":
    main()
