"""Time to an answer: the default `kltd train` run and the matrix sweep end to end, and the evaluation's fast path.

    python scripts/bench_default.py                  # warm-up, 3 rounds of (default run, matrix sweep), eval
    python scripts/bench_default.py --skip-sweep     # the default run and the evaluation only
    python scripts/bench_default.py --rounds 1 --eval-rounds 1 trainer.max_steps=2 eval.num_prompts=4  # smoke
    python scripts/bench_default.py --cells fixed:expert student:student   # also time these cells once each
    python scripts/bench_default.py --skip-sweep --skip-eval --versus data=addition   # against another task

Everything runs in a temporary working directory (outputs/, and the teacher cache at cache.dir inside it),
with WANDB_MODE=disabled (--keep DIR: work in DIR and keep it). Overrides (key=value; before --cells when
both are given) go to every run and to the evaluation below.

1. Warm-up: one untimed default run (`kltd train`, the Quickstart run: SFT) fills the teacher cache, so the
   timed runs see the cache a user's second run sees.
2. `--rounds` rounds (default 3), each: one default run, then (unless --skip-sweep) the matrix sweep at the
   default budget (`kltd train -m sweep=matrix`, every valid cell, one run each, on the launcher kltd picks:
   jobs side by side on a machine without a GPU). Each command is timed from start to exit (its wall time:
   process start, imports, loading, evaluations, checkpoint, and for the sweep the comparison at its end), against the training time its runs report
   (metrics.json `train_time_s`, summed over a sweep's runs; a sweep's runs are found by a glob for
   metrics.json under its directory). Then phase by phase what the command spent: the run's own `phases`
   (seconds by name, in metrics.json) where it records them, the rest of the wall time as `rest`;
   otherwise what can be derived: startup (the command's wall time before the run's own clock starts:
   imports, config), training (train_time_s), other (the run's wall_time_s less training: loading, data,
   evaluations, teacher cache, checkpoint). A sweep's phases are summed over its runs; its startup is
   `outside runs` (process start, imports, config, between runs, the comparison at its end).
   Each round also times the floor: a process that only starts Python, composes the config, imports torch and
   transformers' model code and loads the tokenizer and both models, what every run does before its first
   step. It gives the lowest run_ratio any change to kltd's own code could reach, (floor + training) /
   training, and the same with the run's own evaluation after training added.
3. The evaluation, in this process: the shipped pair and the task's held-out prompts loaded as a run loads
   them (kltd.train.models.load_pair, kltd.data.prepare.prepare; the config composed from conf/ with the
   overrides), then `kltd.train.evaluation.evaluate(..., lean=True)` (kltd's fast path: the lean decoder,
   and whatever else evaluate runs fast with lean=True) against `evaluate(..., lean=False)` (the models' own
   forward everywhere), with the default EvalConfig (or the overrides' eval.*), after one
   untimed call of each on a few prompts, in `--eval-rounds` rounds (default 3) that alternate which goes
   first.

--versus "OVERRIDES" (one argument, space-separated): each round also times the default run with these overrides
added (after the default run's own overrides), in the order default, versus in even rounds and versus, default in
odd ones, each with its own warm-up and teacher cache; then the same sections for it, and per round the ratios
versus / default of the wall time, the training and the evaluation (the runs' phases), with their medians. Unless
--skip-sweep, the matrix sweep is timed the same way with and without them.

Figures are medians over rounds with their range (min-max); a ratio is taken per round. The last line is
machine-readable:

    run_ratio=<default run wall / its train_time_s> sweep_ratio=<sweep wall / summed train_time_s>
    eval_speedup=<own-forward evaluation time / fast evaluation time>

(one line, 3 decimals each; sweep_ratio=nan with --skip-sweep, eval_speedup=nan with --skip-eval).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_machine import cpu_name  # noqa: E402 (beside this script)

SWEEP = "matrix"


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{cpu_name()}; {device}; torch {torch.__version__} ({torch.get_num_threads()} threads)"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float], fmt: str = ".1f") -> str:
    """'median (min-max)'."""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


# ---------------------------------------------------------------------------------------------------------
# Runs


def kltd_train(args: list[str], workdir: Path, log: Path) -> float:
    """`kltd train ARGS` in `workdir`; its wall time, start to exit. Its output goes to `log`."""
    flags = [a for a in args if a.startswith("-")]  # before the overrides: Hydra's parser wants them there
    cmd = [sys.executable, "-m", "kltd.app.cli", "train", *flags, "trainer.progress=false",
           *(a for a in args if not a.startswith("-"))]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"bench_default: `kltd train {' '.join(args)}` failed (exit {proc.returncode}); log: {log}")
    return wall


def floor_time(overrides: list[str]) -> float:
    """Wall seconds of a process that does only what every run must before its first step and nothing else:
    start Python, compose the config, import torch and transformers' model code, load the tokenizer and both
    models (--floor-only)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-only", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def load_only(overrides: list[str]) -> None:
    from kltd.train.models import check_tokenizers

    m = compose_config(overrides).model
    load_models(m, check_tokenizers(m.teacher, m.student, trust_remote_code=m.trust_remote_code))


def load_models(m, tokenizer):
    """The pair as a run loads it, from the typed config's `model` section."""
    from kltd.train.models import load_pair

    return load_pair(m.teacher, m.student, m.dtype, m.device, tokenizer=tokenizer, teacher_device=m.teacher_device,
                     trust_remote_code=m.trust_remote_code)


def completed(metrics: Path) -> dict:
    summary = json.loads(metrics.read_text())
    if summary.get("status") != "completed":
        raise SystemExit(f"bench_default: {metrics} says {summary.get('status')!r}: {summary.get('error', '')}")
    return summary


def phases_of(wall: float, summaries: list[dict]) -> dict[str, float]:
    """Seconds by phase for one command (one run, or a sweep's runs summed): the runs' own `phases` where
    every run records them (the rest of the wall time as `rest`), else startup / training / other (for a
    sweep, `outside runs` in place of startup)."""
    if all(isinstance(s.get("phases"), dict) and s["phases"] for s in summaries):
        out: dict[str, float] = {}
        for s in summaries:
            for name, seconds in s["phases"].items():
                out[name] = out.get(name, 0.0) + float(seconds)
        out["rest"] = wall - sum(out.values())
        return out
    train = sum(s["train_time_s"] for s in summaries)
    inside = sum(s["wall_time_s"] for s in summaries)
    return {"startup" if len(summaries) == 1 else "outside runs": wall - inside, "training": train,
            "other": inside - train}


PHASE_NOTES = {
    "startup": "before the run's own clock: process start, imports, config",
    "outside runs": "outside the runs' own clocks: process start, imports, config, between runs, the comparison",
    "training": "train_time_s",
    "other": "wall_time_s less training: loading, data, evaluations, teacher cache, checkpoint",
    "rest": "the wall time the run's phases do not cover",
}


def default_run(workdir: Path, name: str, cache: Path, overrides: list[str]) -> dict:
    run_dir = workdir / "runs" / name
    wall = kltd_train([f"hydra.run.dir={run_dir}", f"cache.dir={cache}", *overrides], workdir,
                      workdir / "logs" / f"{name}.log")
    summary = completed(run_dir / "metrics.json")
    return {"wall": wall, "train": summary["train_time_s"], "run_wall": summary["wall_time_s"],
            "method": summary["method"], "steps": summary["steps"], "phases": phases_of(wall, [summary]),
            "accuracy": (summary.get("eval_after") or {}).get("accuracy")}


def sweep_run(workdir: Path, name: str, cache: Path, overrides: list[str]) -> dict:
    sweep_dir = workdir / "sweeps" / name
    wall = kltd_train(["-m", f"sweep={SWEEP}", f"hydra.sweep.dir={sweep_dir}", f"cache.dir={cache}", *overrides],
                      workdir, workdir / "logs" / f"{name}.log")
    found = [(p, json.loads(p.read_text())) for p in sorted(sweep_dir.glob("**/metrics.json"))]
    # runs only (each has a status), not any file of the sweep's comparison that shares the name
    summaries = [completed(p) for p, s in found if isinstance(s, dict) and "status" in s]
    if not summaries:
        raise SystemExit(f"bench_default: the sweep wrote no run's metrics.json under {sweep_dir}")
    train = sum(s["train_time_s"] for s in summaries)
    return {"wall": wall, "train": train, "runs": len(summaries), "methods": [s["method"] for s in summaries],
            "run_walls": sum(s["wall_time_s"] for s in summaries), "phases": phases_of(wall, summaries),
            "per_run": {s["method"]: (s["train_time_s"], s["wall_time_s"]) for s in summaries}}


def print_floor(runs: list[dict]) -> None:
    """What no change to kltd's own code can remove from the default run: the floor, and the run_ratio that
    remains with nothing but the floor, the training and the run's own evaluation after it."""
    floors = [r["floor"] for r in runs]
    lowest = [(r["floor"] + r["train"]) / r["train"] for r in runs]
    with_eval = [(r["floor"] + r["train"] + r["phases"].get("evaluation", 0.0)) / r["train"] for r in runs]
    print(f"  {'floor (start, config, imports, load the pair)':<45} {spread(floors)} s  (a process that does only that)")
    print(f"  {'lowest run_ratio: (floor + training) / training':<45} {spread(lowest, '.3f')}")
    print(f"  {'  ... + the evaluation after training':<45} {spread(with_eval, '.3f')}")


def print_versus(versus: str, runs: list[dict], others: list[dict], what: str = "") -> None:
    """The runs (or sweeps, `what` names them) with `versus` added: their sections, then per round the ratios
    versus / default."""
    if what:
        print_command(f"{what} with {versus} ({others[0]['runs']} runs, warm teacher cache)", others)
    else:
        print_command(f"with {versus} (kltd train {versus}: {others[0]['method']}, {others[0]['steps']} steps, "
                      "warm teacher cache)", others)
    print(f"\n{(what + ' ') if what else ''}{versus} / default, per round (the two of a round back to back), "
          "median (min-max):")
    parts = {"wall": lambda r: r["wall"], "training": lambda r: r["train"],
             "evaluation": lambda r: r["phases"].get("evaluation", float("nan"))}
    for name, part in parts.items():
        ratios = [part(v) / part(d) for d, v in zip(runs, others)]
        print(f"  {name:<12} {spread(ratios, '.3f')}")


def print_command(title: str, results: list[dict]) -> None:
    walls, trains = [r["wall"] for r in results], [r["train"] for r in results]
    ratios = [r["wall"] / r["train"] for r in results]
    print(f"\n{title}: {len(results)} round(s), median (min-max)")
    training = f"training (train_time_s{', summed over runs' if 'runs' in results[0] else ''})"
    print(f"  {'wall (the command, start to exit)':<45} {spread(walls)} s")
    print(f"  {training:<45} {spread(trains)} s")
    print(f"  {'wall / training':<45} {spread(ratios, '.3f')}")
    print("  phases (s, share of the wall time):")
    names = list(dict.fromkeys(name for r in results for name in r["phases"]))
    for name in names:
        values = [r["phases"].get(name, 0.0) for r in results]
        share = statistics.median(values) / statistics.median(walls)
        note = f"  ({PHASE_NOTES[name]})" if name in PHASE_NOTES else ""
        print(f"    {name:<12} {spread(values):>20} s {share:6.1%}{note}")


# ---------------------------------------------------------------------------------------------------------
# The evaluation, in this process


def compose_config(overrides: list[str]):
    """The typed config `kltd train OVERRIDES` runs with (composed from conf/, as the command does)."""
    from hydra import compose, initialize_config_dir

    from kltd.app.checks import normalized
    from kltd.app.compose import config_dir, to_typed

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        job = [o for o in normalized(overrides) if not o.lstrip("+~").startswith("hydra") and not o.startswith("-")]
        return to_typed(compose("config", overrides=job))


def eval_speed(overrides: list[str], rounds: int) -> dict:
    """Seconds of evaluate(lean=True) and evaluate(lean=False) on the run's held-out prompts, alternating."""
    from kltd.app.process import configure_process
    from kltd.data.prepare import prepare
    from kltd.train.evaluation import evaluate
    from kltd.schema.config import needs_responses
    from kltd.train.models import check_tokenizers
    from kltd.train.threads import job_threads, threads_for
    from kltd.train.trainer import seed_everything

    cfg = compose_config(overrides)
    configure_process(cfg.trainer.keep_freed_memory)  # what `kltd train` applies at its entry point
    seed_everything(cfg.seed)
    m = cfg.model
    tokenizer = check_tokenizers(m.teacher, m.student, trust_remote_code=m.trust_remote_code)
    data = prepare(cfg.data, tokenizer, needs_responses=needs_responses(cfg))
    pair = load_models(m, tokenizer)
    examples = data.eval[: cfg.eval.num_prompts]

    def run(lean: bool, prompts: list) -> tuple[float, dict]:
        start = time.perf_counter()
        result = evaluate(pair.student, pair.teacher, pair.tokenizer, prompts, cfg.eval, checker=data.checker,
                          lean=lean, vocab=pair.vocab_size)
        return time.perf_counter() - start, result

    times: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, dict] = {}
    with job_threads(threads_for(cfg.trainer.num_threads, pair.device, (pair.teacher, pair.student))) as threads:
        for lean in (True, False):  # one-time costs (first calls, allocations) outside the timed calls
            run(lean, examples[:8])
        for r in range(rounds):
            for lean in ((True, False) if r % 2 == 0 else (False, True)):
                seconds, results[lean] = run(lean, examples)
                times[lean].append(seconds)
    return {"fast": times[True], "own": times[False], "prompts": len(examples), "threads": threads,
            "settings": cfg.eval, "device": str(pair.device),
            "accuracy": {lean: results[lean].get("accuracy") for lean in results},
            "reverse_kl": {lean: results[lean]["reverse_kl_student_states"] for lean in results}}


def print_eval(e: dict) -> float:
    ratios = [own / fast for fast, own in zip(e["fast"], e["own"])]
    s = e["settings"]
    print(f"\nevaluation in this process ({e['prompts']} prompts, batch {s.batch_size}, pass_k {s.pass_k}, "
          f"{s.max_new_tokens} new tokens; {e['device']}, {e['threads']} thread(s)); {len(ratios)} alternating "
          "round(s), median (min-max)")
    print(f"  fast (lean=True, kltd's fast path)        {spread(e['fast'], '.2f')} s")
    print(f"  own forward (lean=False)                  {spread(e['own'], '.2f')} s")
    print(f"  own / fast                                {spread(ratios, '.3f')}")
    for lean, name in ((True, "fast"), (False, "own forward")):
        acc = e["accuracy"][lean]
        print(f"  {name}: accuracy {'-' if acc is None else format(acc, '.3f')}, "
              f"reverse KL on student samples {e['reverse_kl'][lean]:.4f}")
    return statistics.median(ratios)


# ---------------------------------------------------------------------------------------------------------


def ratio(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="timed default runs (and sweeps), alternating")
    parser.add_argument("--eval-rounds", type=int, default=3, help="alternating rounds of the two evaluations")
    parser.add_argument("--skip-sweep", action="store_true", help="no matrix sweep (sweep_ratio=nan)")
    parser.add_argument("--skip-eval", action="store_true", help="no evaluation timing (eval_speedup=nan)")
    parser.add_argument("--cells", nargs="*", default=[],
                        help="also time these prefix:trajectory cells, one run each, after the rounds")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    parser.add_argument("--versus", metavar="OVERRIDES",
                        help="also time the default run with these overrides (one argument), alternating with it")
    parser.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)  # see floor_time
    parser.add_argument("overrides", nargs="*", help="kltd train overrides for every run, e.g. trainer.max_steps=2")
    args = parser.parse_args()
    if args.floor_only:
        return load_only(args.overrides)
    if args.rounds < 1 or args.eval_rounds < 1:
        raise SystemExit("--rounds and --eval-rounds must be >= 1")
    for cell in args.cells:
        if cell.count(":") != 1 or "=" in cell:
            raise SystemExit(f"--cells takes prefix:trajectory pairs, not {cell!r} (put overrides before --cells)")
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) before: {load()}; {os.cpu_count()} CPUs", flush=True)
    if args.overrides:
        print(f"overrides for every run: {' '.join(args.overrides)}")

    with tempfile.TemporaryDirectory(prefix="bench_default_") as tmp:
        work = Path(args.keep or tmp).resolve()
        (work / "logs").mkdir(parents=True, exist_ok=True)
        cache = work / "cache"
        warm = default_run(work, "warmup", cache, args.overrides)
        print(f"warm-up default run ({warm['method']}, untimed; fills the teacher cache at {cache}): "
              f"wall {warm['wall']:.1f} s, training {warm['train']:.1f} s", flush=True)
        versus = [*args.overrides, *(args.versus or "").split()]
        if args.versus:
            warm_v = default_run(work, "warmup_versus", work / "cache_versus", versus)
            print(f"warm-up with {args.versus} ({warm_v['method']}, untimed): wall {warm_v['wall']:.1f} s, "
                  f"training {warm_v['train']:.1f} s", flush=True)
        runs, sweeps, others, other_sweeps = [], [], [], []
        for r in range(args.rounds):
            if args.versus and r % 2:
                others.append(default_run(work, f"versus_{r}", work / "cache_versus", versus))
            d = default_run(work, f"default_{r}", cache, args.overrides)
            d["floor"] = floor_time(args.overrides)
            runs.append(d)
            if args.versus and not r % 2:
                others.append(default_run(work, f"versus_{r}", work / "cache_versus", versus))
            line = (f"round {r + 1}: default run wall {d['wall']:.1f} s, training {d['train']:.1f} s "
                    f"(x{d['wall'] / d['train']:.2f}); floor {d['floor']:.1f} s")
            if args.versus:
                v = others[-1]
                line += f"; with {args.versus} wall {v['wall']:.1f} s, training {v['train']:.1f} s"
            if not args.skip_sweep:
                if args.versus and r % 2:
                    other_sweeps.append(sweep_run(work, f"sweep_versus_{r}", work / "cache_versus", versus))
                s = sweep_run(work, f"sweep_{r}", cache, args.overrides)
                sweeps.append(s)
                if args.versus and not r % 2:
                    other_sweeps.append(sweep_run(work, f"sweep_versus_{r}", work / "cache_versus", versus))
                line += (f"; sweep={SWEEP} ({s['runs']} runs) wall {s['wall']:.1f} s, training {s['train']:.1f} s "
                         f"(x{s['wall'] / s['train']:.2f})")
                if args.versus:
                    v = other_sweeps[-1]
                    line += f"; with {args.versus} wall {v['wall']:.1f} s, training {v['train']:.1f} s"
            print(line, flush=True)
        cell_lines = []
        for cell in args.cells:
            prefix, trajectory = cell.split(":")
            name = f"cell_{prefix}-{trajectory}"
            d = default_run(work, name, cache, [f"prefix={prefix}", f"trajectory={trajectory}", *args.overrides])
            cell_lines.append(f"  {d['method']:<20} wall {d['wall']:6.1f} s (run's own clock {d['run_wall']:6.1f} s)  "
                              f"training {d['train']:6.1f} s  {d['steps']} steps  {d['steps'] / d['train']:.2f} steps/s")
        evaluation = None if args.skip_eval else eval_speed(args.overrides, args.eval_rounds)
        after = load()
        if args.keep:
            print(f"kept: {work}")

    print(f"\nload average (1, 5, 15 min): before (above), after {after}; {os.cpu_count()} CPUs")
    print_command(f"default run (kltd train: {runs[0]['method']}, {runs[0]['steps']} steps, warm teacher cache)", runs)
    run_ratio = statistics.median(r["wall"] / r["train"] for r in runs)
    print_floor(runs)
    sweep_ratio = float("nan")
    if sweeps:
        print_command(f"sweep={SWEEP} ({sweeps[0]['runs']} runs: {', '.join(sweeps[0]['methods'])})", sweeps)
        print("  per run, median s of training / of the run's own wall time:")
        for method in sweeps[0]["per_run"]:
            trains = [s["per_run"][method][0] for s in sweeps if method in s["per_run"]]
            walls = [s["per_run"][method][1] for s in sweeps if method in s["per_run"]]
            print(f"    {method:<28} {statistics.median(trains):8.1f} {statistics.median(walls):8.1f}")
        sweep_ratio = statistics.median(s["wall"] / s["train"] for s in sweeps)
    if others:
        print_versus(args.versus, runs, others)
    if other_sweeps:
        print_versus(args.versus, sweeps, other_sweeps, f"sweep={SWEEP}")
    if cell_lines:
        print("\ncells, one run each (warm teacher cache):")
        print("\n".join(cell_lines))
    eval_speedup = float("nan") if evaluation is None else print_eval(evaluation)
    print(f"run_ratio={ratio(run_ratio)} sweep_ratio={ratio(sweep_ratio)} eval_speedup={ratio(eval_speedup)}",
          flush=True)


if __name__ == "__main__":
    main()
