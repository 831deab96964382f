"""The GPU path in a few minutes: OPD and SFT steps of a real-size pair in bfloat16, with throughput and memory.

    python scripts/gpu_check.py                 # on a CUDA machine: a random Qwen2.5-0.5B-shaped pair
    python scripts/gpu_check.py --vllm          # ... and OPD again with sampling.backend=vllm (the vllm extra)
    python scripts/gpu_check.py --smoke         # anywhere: a 2-layer stand-in on the CPU (what the tests run)
    python scripts/gpu_check.py --shapes qwen2.5,smollm2,qwen3   # ... and the benchmark's real-shape pairs

Shapes: `qwen2.5` (the default) is a Qwen2.5-0.5B-shaped teacher and student; `smollm2` and `qwen3` are
scripts/bench_vs_trl.py's real-shape pairs (bench_scales.REAL_SHAPES: a SmolLM2-135M-shaped teacher with a
10-layer student; a Qwen3-1.7B-shaped teacher with a Qwen3-0.6B-shaped student), with --smoke shrunk as
that script's --quick shrinks them.

Random teacher and student of the same shape go through kltd's own loading code (saved, then loaded with
model.dtype=bfloat16), then the trainer runs `--steps` timed steps after one warm-up step of each cell:
OPD (prefix=student trajectory=student: the student samples every state) and SFT (prefix=fixed
trajectory=dataset). Prompts are random token ids. Printed per cell: seconds per step (median and range),
trained tokens per second, sampled tokens per second and peak memory (CUDA: max allocated; CPU: peak
resident). The last line is machine-readable:

    gpu_check device=<d> dtype=bfloat16 opd_s=<s> opd_tok_s=<t> opd_peak_mb=<m> sft_s=... [vllm_opd_s=...]
              [smollm2_opd_s=... smollm2_sft_s=... qwen3_opd_s=...]   (other shapes' keys carry their name)
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):  # kltd itself, and bench_scales beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
SHAPES = ("qwen2.5", "smollm2", "qwen3")


def shape(smoke: bool):
    from transformers import Qwen2Config

    if smoke:  # head_dim 64, as vLLM's CPU attention needs
        return Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, eos_token_id=1, pad_token_id=1)
    # Qwen2.5-0.5B's shape (494M parameters), with its real vocabulary
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, eos_token_id=151643, pad_token_id=151643)


class IdTokenizer:
    """Prompts and responses written as token ids ("12 7 99"): all the trainer asks of a tokenizer here."""

    def __init__(self, eos: int):
        self.eos_token_id = self.pad_token_id = eos

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(token) for token in text.split()]

    def batch_decode(self, rows) -> list[str]:
        return [" ".join(map(str, row)) for row in rows]


def pair_configs(name: str, smoke: bool) -> tuple:
    """(teacher config, student config) of a shape."""
    if name == "qwen2.5":
        return shape(smoke), shape(smoke)
    from bench_scales import REAL_SHAPES, real_config

    teacher, student, _ = REAL_SHAPES[name]
    return tuple(real_config(c, quick=smoke, eos=1, pad=1) for c in (teacher, student))


def saved_pair(root: Path, name: str, smoke: bool) -> tuple[str, str, int, int]:
    import torch
    from transformers import AutoModelForCausalLM

    configs = pair_configs(name, smoke)
    for seed, role, config in ((0, "teacher", configs[0]), (1, "student", configs[1])):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name / role)
    return str(root / name / "teacher"), str(root / name / "student"), configs[1].vocab_size, configs[1].eos_token_id


def cell(name: str, device: str, backend: str, batch: int, new_tokens: int, teacher: str, student: str):
    from kltd.schema.config import Config

    cfg = Config()
    cfg.model.teacher, cfg.model.student = teacher, student
    cfg.prefix.source, cfg.trajectory.supervisor = ("student", "student") if name == "opd" else ("fixed", "dataset")
    cfg.model.dtype, cfg.model.device, cfg.cache.teacher = "bfloat16", device, "off"
    cfg.trainer.batch_size, cfg.sampling.max_new_tokens = batch, new_tokens
    if backend != "kltd":
        cfg.sampling.backend = backend
    return cfg


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def measure(cfg, teacher: str, student: str, vocab: int, eos: int, steps: int, prompt_tokens: int) -> dict:
    import torch

    from kltd.data.example import Example
    from kltd.train.models import ModelPair, load_model, pick_device
    from kltd.train.trainer import Trainer

    device = pick_device(cfg.model.device)
    pair = ModelPair(load_model(teacher, cfg.model.dtype, device).eval().requires_grad_(False),
                     load_model(student, cfg.model.dtype, device).train(), IdTokenizer(eos), device, vocab)
    rng = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(map(str, torch.randint(2, vocab, (n,), generator=rng).tolist()))  # noqa: E731
    examples = [Example(words(prompt_tokens), words(cfg.sampling.max_new_tokens - 1)) for _ in range(256)]
    trainer = Trainer(cfg, pair, examples)
    trainer.step()  # warm-up: kernels, allocator, the fast path's arranged weights
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, trained, sampled, losses = [], 0, 0, []
    for _ in range(steps):
        start = time.perf_counter()
        stats = trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        trained, sampled = trained + stats.trained_tokens, sampled + stats.tokens.student_generated
        losses.append(stats.loss)
    trainer.close()
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"gpu_check: non-finite loss {losses}")
    return {"s": statistics.median(times), "lo": min(times), "hi": max(times), "tok_s": trained / sum(times),
            "sampled_s": sampled / sum(times), "peak_mb": peak_mb(device), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a check of the script itself)")
    parser.add_argument("--vllm", action="store_true", help="also OPD with sampling.backend=vllm")
    parser.add_argument("--shapes", default="qwen2.5", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    import torch

    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    if not shapes or set(shapes) - set(SHAPES):
        sys.exit(f"gpu_check: --shapes takes names from {', '.join(SHAPES)}; got {args.shapes!r}")
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine, or with --smoke for the CPU stand-in")
    runs = [("opd", "kltd"), ("sft", "kltd")] + ([("opd", "vllm")] if args.vllm else [])
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for shape_name in shapes:
            teacher, student, vocab, eos = saved_pair(Path(root), shape_name, args.smoke)
            prefix = "" if shape_name == "qwen2.5" else f"{shape_name}_"
            for name, backend in runs:
                cfg = cell(name, device, backend, args.batch, args.new_tokens, teacher, student)
                r = measure(cfg, teacher, student, vocab, eos, args.steps, args.prompt_tokens)
                key = prefix + (name if backend == "kltd" else f"{backend}_{name}")
                results[key] = r
                print(f"{key:>16} on {r['device']}: {r['s']:.3f} s/step ({r['lo']:.3f}-{r['hi']:.3f}), "
                      f"{r['tok_s']:,.0f} trained tok/s, {r['sampled_s']:,.0f} sampled tok/s, "
                      f"peak {r['peak_mb']:,.0f} MB", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
    fields = " ".join(f"{key}_s={r['s']:.4f} {key}_tok_s={r['tok_s']:.0f} {key}_peak_mb={r['peak_mb']:.0f}"
                      for key, r in results.items())
    print(f"gpu_check device={next(iter(results.values()))['device']} dtype=bfloat16 {fields}")


if __name__ == "__main__":
    main()
