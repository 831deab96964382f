"""Time kltd against TRL on the same teacher, student, data and settings (CPU).

    pip install -e '.[bench]'                            # TRL is only the baseline, never a kltd dependency
    python scripts/bench_vs_trl.py                       # toy and 32k, 3 rounds (tens of minutes on 2 cores)
    python scripts/bench_vs_trl.py --scales toy,2k,32k --repeats 5 --json runs.json
    python scripts/bench_vs_trl.py --report runs.json    # re-print a saved run's report
    python scripts/bench_vs_trl.py --quick --scales toy,2k,32k   # tiny models, in this process: the smoke test

What is compared (same models, tokenizer, prompts/responses, batch size, lengths, sampling settings,
learning rate, AdamW, fp32, step count):

  opd    kltd prefix=student trajectory=student (reverse KL on student samples)
         vs TRL DistillationTrainer(beta=1) and experimental GKDTrainer(lmbda=1, beta=1), each with its
         default gradient checkpointing (on) and without it; the ratio is taken against the fastest.
  fixed  kltd prefix=fixed trajectory=expert (forward KL on dataset responses, teacher scored live)
         vs GKDTrainer(lmbda=0, beta=0), with its default gradient checkpointing and without.
  parity one batch, one set of logits: kltd's losses against TRL's generalized_jsd_loss (and
         DistillationTrainer's chunked loss) for beta in {0, 0.5, 1}; relative difference < 1e-5.

Scales (scripts/bench_scales.py): `toy` is the shipped character-level pair (kltd/assets/toy; random
4x256 / 2x128 stand-ins when it is missing, said so in the output) on the built-in addition task, batch 32,
48 new tokens; `2k` and `32k` are random Llama pairs of one shape (4x256 / 2x128) with a 2,000- and a
32,000-token vocabulary, batch 16 and 256-token sequences (32 prompt + 224 response tokens): at 32k the
[B, T, V] logits dominate time and memory, at 2k the model bodies do. `smollm2` and `qwen3` are real
published shapes with random weights (a SmolLM2-135M teacher with a 10-layer student; a Qwen3-1.7B teacher
with a Qwen3-0.6B student), 32 prompt + 64 response tokens, OPD batch 4 and fixed batch 8; at these scales
kltd's sampler is also timed against vLLM's engine (scripts/bench_sampler.py; --vllm-python names an
interpreter with vllm). Both systems read the examples in
the same order (sequential samplers), so step i trains on the same prompts in every run.

kltd's runs keep freed memory for reuse (kltd.fast.memory), as `kltd train` does at its entry point unless
trainer.keep_freed_memory=false. TRL runs in two settings in every round: as shipped, and with the same
malloc setting (like for like). Each round runs, for every case and TRL setup, one kltd run and then the
TRL run in each setting (the settings' order alternates from round to round); both TRL runs are paired
with that kltd run. Every measured run is a fresh subprocess (so peak memory and the malloc setting are
per run) after warm-up steps; --quick runs everything in this process, where the malloc setting, once
applied, holds for every later run, so --quick does not tell the two settings apart.

Per run: median seconds per optimiser step, trained (supervised) tokens per second, and peak resident
memory above the level right after setup (sampled every 2 ms during the timed steps). The machine's fp32
matmul rate is measured in the same invocation, and the fixed-prefix runs' model FLOP/s are reported as a
fraction of it; the load average before and after and the CPU count head the report. Each ratio is
kltd's run over its paired TRL run, one per round, reported as the median over rounds with the range
(min-max); the case ratio is against the fastest TRL setup (by median s/step) in that setting.

This file is the command line and the rounds; beside it, scripts/bench_workers.py runs and measures one run,
bench_parity.py the loss parity, bench_machine.py the machine line and matmul rate, bench_scales.py the
scales and bench_report.py the report.

The last line is machine-readable (key=value, space-separated; these keys first, in this order):

    ratio_opd=<kltd/TRL s/step> ratio_fixed=<...> ratio_mem=<kltd/TRL peak> parity=<ok|fail>
    ratio_opd_same_malloc=<...> ratio_fixed_same_malloc=<...> ratio_mem_same_malloc=<...>
    then per scale S that was run: ratio_opd_S= ratio_fixed_S= ratio_opd_same_malloc_S= ratio_fixed_same_malloc_S=
    then ratio_mem_S= per scale (kltd's peak over TRL's lowest of the same case, the larger case), and at the
    real-shape scales sampler_vs_vllm_S= (kltd's tokens/s over vLLM's, the lower of the batch sizes; `skipped`
    without vLLM)

(all on one line). ratio_opd and ratio_fixed are TRL as shipped, the median over rounds, the worst (largest)
over the scales run; *_same_malloc the same against TRL with kltd's malloc setting; ratio_mem is against
GKDTrainer (the lower of its two settings) at the last scale run; per-scale keys are that scale's median.
See docs/performance.md for measured numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):  # kltd itself, and the bench_* modules beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_machine import machine_line, matmul_gflops  # noqa: E402 (needs the path above)
from bench_parity import parity  # noqa: E402
from bench_report import TRL_SETTINGS, TRL_SETUPS, report, run_key  # noqa: E402
from bench_sampler import sampler_rounds  # noqa: E402
from bench_scales import REAL_SHAPES, build_scales  # noqa: E402
from bench_workers import run_one  # noqa: E402 (also sets the workers' quiet, offline environment)


def show(rep: int, name: str, r: dict, extra: str = "") -> None:
    print(f"  round {rep + 1}: {name:<30} {statistics.median(r['times']):7.3f} s/step"
          f"  peak +{(r['peak'] - r['baseline']) / 2**20:7.0f} MB{extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (>= 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating rounds (kltd, then TRL in both settings) per setup (default 3; 1 with --quick)")
    parser.add_argument("--scales", default="toy,32k", help="comma-separated: toy, 2k, 32k, smollm2, qwen3")
    parser.add_argument("--toy-teacher", default=str(REPO / "kltd" / "assets" / "toy" / "teacher"))
    parser.add_argument("--toy-student", default=str(REPO / "kltd" / "assets" / "toy" / "student"))
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and sizes, 1 repeat, runs in this process: a smoke test, not a benchmark")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every run (default: torch's own choice, one per core; 1 with --quick)")
    parser.add_argument("--trl-setups", type=lambda text: text.split(","),
                        help="only these TRL setups (comma-separated, e.g. gkd1_nogc,gkd0_nogc, the fastest in "
                             "docs/performance.md); default: all, the ratio then against the fastest measured")
    parser.add_argument("--sampler-rows", default="4,64",
                        help="at the real-shape scales, kltd's sampler against vLLM's at these batch sizes "
                             "(comma-separated; empty: skip)")
    parser.add_argument("--vllm-python", help="an interpreter with vllm installed, for vLLM's side of the sampler "
                                              "comparison (default: this one; skipped with a note if it lacks vllm)")
    parser.add_argument("--log-dir", help="where a failed sampler side leaves its output (default: the temporary "
                                          "folder, removed at the end)")
    parser.add_argument("--json", help="also write every run to this file (re-print it with --report)")
    parser.add_argument("--report", metavar="JSON", help="print the report of a run saved with --json; run nothing")
    args = parser.parse_args()

    if args.report:
        data = json.loads(Path(args.report).read_text())
        print(f"machine: {data['machine']}\nrun: {data.get('command', '')}")
        report(data)
        return

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is the baseline and is not installed: pip install -e '.[bench]'")
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), 1
        args.threads = args.threads or 1  # a loaded machine makes multi-threaded tiny ops crawl
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step pays one-time costs)")
    if args.trl_setups is not None:
        known = {setup for setups in TRL_SETUPS.values() for setup in setups}
        if set(args.trl_setups) - known or any(not set(args.trl_setups) & set(v) for v in TRL_SETUPS.values()):
            raise SystemExit(f"--trl-setups takes at least one setup per case from {sorted(known)}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1 (3 or more for a figure with a range)")
    args.scales = [s.strip() for s in args.scales.split(",") if s.strip()]

    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        work = Path(tmp)
        loads = [os.getloadavg()]
        print(f"machine: {machine_line()}", flush=True)
        print(f"load average before (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in loads[0])}; {os.cpu_count()} CPUs "
              "(other work on the machine slows every run, multi-threaded ones unevenly)", flush=True)
        scales = build_scales(args, work)
        gflops = [matmul_gflops(seconds=0.3 if args.quick else 1.5)]
        print(f"fp32 matmul (1024^3, torch): {gflops[0]:.1f} GFLOP/s", flush=True)

        parity_rows = []
        for scale in scales:
            parity_rows += [(scale.name, *row) for row in parity(scale)]

        runs: dict[str, list[dict]] = {}
        for scale in scales:
            batches = (f"batch {scale.batch_size}" if scale.fixed_batch_size is None
                       else f"batch {scale.batch_size} (opd), {scale.fixed_batch_size} (fixed)")
            print(f"\n[{scale.name}] {scale.note}; {batches}, max_new_tokens {scale.max_new_tokens}", flush=True)
            for rep in range(args.repeats):
                # TRL's two settings take turns at being right after the kltd run they are paired with
                settings = list(TRL_SETTINGS) if rep % 2 == 0 else list(reversed(TRL_SETTINGS))
                for case, setups in TRL_SETUPS.items():
                    for setup in [s for s in setups if args.trl_setups is None or s in args.trl_setups]:
                        base = dict(scale=scale.name, teacher=scale.teacher, student=scale.student, data=scale.data,
                                    batch_size=scale.batch_for(case), max_new_tokens=scale.max_new_tokens,
                                    warmup=args.warmup, steps=args.steps, workdir=str(work / "trl_out"),
                                    threads=args.threads, round=rep)
                        k = run_one({**base, "system": "kltd", "case": case}, in_process=args.quick)
                        runs.setdefault(f"{scale.name}|kltd:{case}", []).append(k)
                        k_step = statistics.median(k["times"])
                        show(rep, f"kltd:{case}", k)
                        for setting in settings:
                            system, keep_freed, _, _ = TRL_SETTINGS[setting]
                            spec = {**base, "system": "trl", "case": setup, "trl_keep_freed_memory": keep_freed}
                            r = {**run_one(spec, in_process=args.quick), "paired_kltd": k_step, "setting": setting}
                            runs.setdefault(run_key(scale.name, setting, setup), []).append(r)
                            show(rep, f"{system}:{setup}", r, f"  kltd/this {k_step / statistics.median(r['times']):.3f}")
        sampling = {}
        sampler_rows = [int(n) for n in args.sampler_rows.split(",") if n.strip()]
        for scale in [s for s in scales if s.name in REAL_SHAPES and sampler_rows]:
            print(f"\n[{scale.name}] sampling {scale.max_new_tokens} tokens with the student: kltd's sampler vs vLLM's "
                  f"engine, rows {', '.join(map(str, sampler_rows))}", flush=True)
            sampling[scale.name] = sampler_rounds(scale, sampler_rows, args.repeats, calls=1 if args.quick else 3,
                                                  vllm_python=args.vllm_python, log_dir=args.log_dir or tmp,
                                                  threads=args.threads)
        gflops.append(matmul_gflops(seconds=0.3 if args.quick else 1.5))
        loads.append(os.getloadavg())
        print(f"load average after: {' '.join(f'{x:.2f}' for x in loads[-1])}")
        data = {"machine": machine_line(), "command": " ".join(sys.argv), "gflops": gflops, "loadavg": loads,
                "cpu_count": os.cpu_count(),
                "parity": parity_rows, "runs": runs, "sampling": sampling, "scales": [asdict(s) for s in scales], "args": vars(args)}
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1))
        report(data)


if __name__ == "__main__":
    main()
