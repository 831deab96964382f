"""The evaluation's share of a run's wall time at a real model shape (issue 25, item 4).

    python scripts/bench_eval_share.py                        # smollm2, 3 rounds, 2 steps, 16 prompts
    python scripts/bench_eval_share.py --scale qwen3 --rounds 1
    python scripts/bench_eval_share.py --quick                # shrunk models: a smoke test, not a benchmark

Each round runs `kltd train prefix=student trajectory=student` (OPD) as a user runs it, in a fresh process and
a fresh cache, on a pair of the scale's shape with random weights (scripts/bench_scales.REAL_SHAPES: nothing
is downloaded) and rows of random words from a data file (32-word prompts, 64-word responses), with every
setting at its default except the models, the data, trainer.max_steps (--steps) and eval.num_prompts
(--prompts). Random weights never choose the end token, so every response runs to the full budget: the most
the evaluation can cost at these settings. From the run's metrics.json: the seconds per training step
(train_time_s / steps) and per evaluated question (the `evaluation` phase over the questions of the evaluation
before training, unless eval.before=false, and after it). Then the share of the evaluations in

- this run: evaluation / (evaluation + training), as measured;
- a default-length run: both evaluations of eval.num_prompts=200 questions and trainer.max_steps=200 steps,
  from the per-step and per-question times. An upper bound where --prompts is below 200: a question costs
  less in a larger batch (decoding reads every weight once per token for all rows), and at the defaults one
  batch holds all 200;
- a cell of a sweep: only the evaluation after training, as the evaluation before it is computed once per
  sweep and read from the cache by every other cell (kltd.train.eval_cache).

Figures are medians over rounds with their range. The last line is machine-readable:

    eval_share_run=<measured> eval_share_default=<projected, one run> eval_share_sweep=<projected, a sweep's cell>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_default import completed, kltd_train  # noqa: E402
from bench_scales import REAL_SHAPES, real_shape_scale  # noqa: E402

DEFAULT_STEPS = DEFAULT_PROMPTS = 200  # trainer.max_steps and eval.num_prompts at their defaults


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="smollm2", choices=sorted(REAL_SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="training steps per run (trainer.max_steps)")
    p.add_argument("--prompts", type=int, default=16, help="questions per evaluation (eval.num_prompts)")
    p.add_argument("--quick", action="store_true", help="shrunk models (same family, heads and vocabulary)")
    p.add_argument("--keep", type=Path, help="work here and keep the runs (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.prompts) < 1:
        p.error("--rounds, --steps and --prompts must be at least 1")
    return args


def write_rows(rows: list[dict], path: Path) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["response"]}) + "\n")


def one_run(work: Path, name: str, teacher: str, student: str, data: Path, args) -> dict:
    """One `kltd train` in its own process and cache; its metrics.json figures."""
    run_dir = work / "runs" / name
    wall = kltd_train(["prefix=student", "trajectory=student", f"model.teacher={teacher}",
                       f"model.student={student}", "data=file", f"data.path={data}", f"trainer.max_steps={args.steps}",
                       f"eval.num_prompts={args.prompts}", f"cache.dir={work / 'caches' / name}",
                       f"hydra.run.dir={run_dir}", *args.overrides], work, work / f"{name}.log")
    metrics = completed(run_dir / "metrics.json")
    evaluation, training = metrics["phases"]["evaluation"], metrics["train_time_s"]
    evaluations = 1 + (metrics["eval_before"] is not None)  # eval.before=false skips the first
    return {"wall": wall, "evaluation": evaluation, "training": training, "per_step": training / metrics["steps"],
            "per_question": evaluation / (evaluations * args.prompts)}


def shares(run: dict) -> dict[str, float]:
    measured = run["evaluation"] / (run["evaluation"] + run["training"])
    training = DEFAULT_STEPS * run["per_step"]
    after = DEFAULT_PROMPTS * run["per_question"]
    return {"run": measured, "default": 2 * after / (2 * after + training), "sweep": after / (after + training)}


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kltd-eval-share-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows, teacher, student, _ = real_shape_scale(args.scale, args.quick, work)
        data = work / "rows.jsonl"
        write_rows(rows, data)
        shape = REAL_SHAPES[args.scale][2] + (" (shrunk: --quick)" if args.quick else "")
        print(f"{args.scale}: {shape}, random weights, fp32; rows of 32 + 64 random words")
        print(f"OPD runs with default settings but trainer.max_steps={args.steps} eval.num_prompts={args.prompts}"
              + "".join(f" {o}" for o in args.overrides))
        runs = []
        for i in range(args.rounds):
            run = one_run(work, f"round{i + 1}", teacher, student, data, args)
            runs.append({**run, **{f"share_{k}": v for k, v in shares(run).items()}})
            print(f"  round {i + 1}: wall {run['wall']:.1f} s, training {run['training']:.1f} s "
                  f"({run['per_step']:.2f} s/step), evaluations {run['evaluation']:.1f} s "
                  f"({run['per_question']:.2f} s/question)", flush=True)
    print(f"seconds per step: {spread([r['per_step'] for r in runs], '.2f')}; "
          f"per evaluated question: {spread([r['per_question'] for r in runs], '.2f')}")
    for key, what in (("run", "this run, measured"),
                      ("default", f"a default-length run ({DEFAULT_STEPS} steps, {DEFAULT_PROMPTS} questions, "
                                  "before and after)"),
                      ("sweep", "a sweep's cell (the evaluation before read from the cache)")):
        print(f"evaluation's share of {what}: {spread([r[f'share_{key}'] for r in runs], '.3f')}")
    print(" ".join(f"eval_share_{k}={statistics.median(r[f'share_{k}'] for r in runs):.3f}"
                   for k in ("run", "default", "sweep")))


if __name__ == "__main__":
    main()
