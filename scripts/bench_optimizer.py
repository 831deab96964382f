"""AdamW's step in the form kltd uses (torch's fused kernel, kltd.train.optim) against torch's default per-tensor
form, on a student of a real shape: the step's time and its peak memory above the optimiser's state.

    python scripts/bench_optimizer.py                 # the SmolLM2-135M-shaped 10-layer student, 5 rounds
    python scripts/bench_optimizer.py --quick         # a small model, 2 rounds: a smoke run

Each round runs both forms, in turn and in fresh processes (alternating which goes first): random weights and
gradients of the same seed, one step to create the state, then `--steps` timed steps with the resident memory
sampled throughout. Printed: each form's median and range; the last line is machine-readable:

    optimizer_time_ratio=<fused / default> optimizer_peak_default_mb=<MB> optimizer_peak_fused_mb=<MB>
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

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

FORMS = ("default", "fused")


def student(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    width, layers, vocab = (64, 2, 4096) if quick else (576, 10, 49152)
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=width // 64 or 1, num_key_value_heads=max(1, width // 192),
                         head_dim=64 if width >= 64 else width, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def worker(form: str, quick: bool, steps: int) -> dict:
    import torch

    from bench_workers import PeakRSS, current_rss
    from kltd.train.optim import adamw

    torch.manual_seed(0)
    model = student(quick)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = adamw(model.parameters(), 1e-3, 0.0) if form == "fused" else \
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    assert bool(optimizer.defaults.get("fused")) == (form == "fused")
    optimizer.step()  # the moments exist from here on
    state = current_rss()
    peak = PeakRSS().start()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "peak_mb": (peak.stop() - state) / 2**20,
            "parameters": sum(p.numel() for p in model.parameters())}


def measure(form: str, quick: bool, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", form, "--steps", str(steps)] + (["--quick"] if quick else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                                   os.environ.get("OMP_NUM_THREADS", "2")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", choices=FORMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, args.steps)))
        return
    rounds = args.rounds or (2 if args.quick else 5)
    results: dict[str, list[dict]] = {form: [] for form in FORMS}
    for r in range(rounds):
        for form in (FORMS if r % 2 == 0 else FORMS[::-1]):
            results[form].append(measure(form, args.quick, args.steps))
    ratios = [f["seconds"] / d["seconds"] for d, f in zip(results["default"], results["fused"])]
    print(f"{results['default'][0]['parameters']:,} parameters, {rounds} rounds of {args.steps} steps, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for form in FORMS:
        print(f"{form:8s} s/step {spread([x['seconds'] for x in results[form]], '.3f')}  "
              f"peak above state MB {spread([x['peak_mb'] for x in results[form]], '.0f')}")
    print(f"fused / default time, per round: {spread(ratios, '.3f')}")
    peaks = {form: statistics.median(x["peak_mb"] for x in results[form]) for form in FORMS}
    print(f"optimizer_time_ratio={statistics.median(ratios):.3f} optimizer_peak_default_mb={peaks['default']:.0f} "
          f"optimizer_peak_fused_mb={peaks['fused']:.0f}")


if __name__ == "__main__":
    main()
