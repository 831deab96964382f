"""Peak memory of one OPD step at a real model's size, on the CPU: kltd's fast path with the weights used as
they are (the default above kltd.fast.arranged.COPY_LIMIT), with them copied into the arranged form (the
default for small models), and the models' own Hugging Face forward.

    python scripts/bench_memory.py                 # a random Qwen2.5-0.5B-shaped pair, ~5 minutes on 2 cores
    python scripts/bench_memory.py --layers 4      # a shallower stand-in, for a quick look

Each variant runs in a fresh process: random teacher and student of the same shape (fp32), batch 4, 32
prompt tokens, 32 sampled tokens (prefix=student trajectory=student), one optimiser step. Reported: peak
resident memory during the step above the level after loading (AdamW's two moments are created in it, the
same for every variant), and the step's time. The last line is machine-readable:

    mem_shared=<MB> mem_copied=<MB> mem_hf=<MB> shared_vs_hf=<ratio> copied_vs_hf=<ratio>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

VARIANTS = ("shared", "copied", "hf")


def qwen_half_billion(layers: int):
    from transformers import Qwen2Config

    # Qwen2.5-0.5B's shape (494M parameters with 24 layers), with a vocabulary kept to its real size
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, eos_token_id=151643, pad_token_id=151643)


def worker(variant: str, layers: int) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    import kltd.fast.arranged as arranged
    from bench_workers import PeakRSS, current_rss
    from kltd.data.example import Example
    from kltd.fast.memory import keep_freed_memory
    from kltd.schema.config import Config
    from kltd.train.models import ModelPair
    from kltd.train.trainer import Trainer

    keep_freed_memory()
    if variant == "copied":
        arranged.COPY_LIMIT = 10**12
    torch.manual_seed(0)
    config = qwen_half_billion(layers)
    teacher, student = Qwen2ForCausalLM(config).eval().requires_grad_(False), Qwen2ForCausalLM(config).train()

    class Tokenizer:  # what the trainer asks of a tokenizer when the student samples every state
        eos_token_id = pad_token_id = 151643

        @staticmethod
        def encode(text: str, add_special_tokens: bool = False) -> list[int]:  # prompts are written as token ids
            return [int(token) for token in text.split()]

    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor, cfg.cache.teacher = "student", "student", "off"
    cfg.trainer.batch_size, cfg.sampling.max_new_tokens = 4, 32
    cfg.trainer.packed_forward = cfg.sampling.lean_decoder = variant != "hf"
    pair = ModelPair(teacher, student, Tokenizer(), torch.device("cpu"), config.vocab_size)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 150000, (32,), generator=generator).tolist() for _ in range(64)]
    examples = [Example(" ".join(map(str, p)), None) for p in prompts]
    trainer = Trainer(cfg, pair, examples)
    params = sum(p.numel() for p in student.parameters())
    baseline = current_rss()
    meter = PeakRSS().start()
    start = time.perf_counter()
    trainer.step()
    seconds = time.perf_counter() - start
    peak = meter.stop()
    return {"variant": variant, "params": params, "baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20,
            "step_mb": (peak - baseline) / 2**20, "seconds": seconds, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers)))
        return
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--layers", str(args.layers)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:>7}: student {r['params'] / 1e6:.0f}M parameters, after loading {r['baseline_mb']:,.0f} MB, "
              f"peak {r['peak_mb']:,.0f} MB, step +{r['step_mb']:,.0f} MB, {r['seconds']:.1f} s ({r['threads']} threads)")
    hf = results["hf"]["step_mb"]
    print(f"mem_shared={results['shared']['step_mb']:.0f} mem_copied={results['copied']['step_mb']:.0f} mem_hf={hf:.0f} "
          f"shared_vs_hf={results['shared']['step_mb'] / hf:.2f} copied_vs_hf={results['copied']['step_mb'] / hf:.2f}")


if __name__ == "__main__":
    main()
