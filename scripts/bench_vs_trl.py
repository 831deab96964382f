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
[B, T, V] logits dominate time and memory, at 2k the model bodies do. Both systems read the examples in
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

The last line is machine-readable (key=value, space-separated; these keys first, in this order):

    ratio_opd=<kltd/TRL s/step> ratio_fixed=<...> ratio_mem=<kltd/TRL peak> parity=<ok|fail>
    ratio_opd_same_malloc=<...> ratio_fixed_same_malloc=<...> ratio_mem_same_malloc=<...>
    then per scale S that was run: ratio_opd_S= ratio_fixed_S= ratio_opd_same_malloc_S= ratio_fixed_same_malloc_S=

(all on one line). ratio_opd and ratio_fixed are TRL as shipped, the median over rounds, the worst (largest)
over the scales run; *_same_malloc the same against TRL with kltd's malloc setting; ratio_mem is against
GKDTrainer (the lower of its two settings) at the last scale run; per-scale keys are that scale's median.
See docs/performance.md for measured numbers.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):  # kltd itself, and bench_report / bench_scales beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_report import TRL_SETTINGS, TRL_SETUPS, report, run_key  # noqa: E402 (needs the path above)
from bench_scales import SEED, Scale, build_scales  # noqa: E402

# Quiet, offline, reproducible workers.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

LR = 1e-4


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers (used inside a worker)


class PeakRSS:
    """Peak resident set size of this process, sampled from /proc/self/statm on a background thread."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._file = open("/proc/self/statm", "rb")  # noqa: SIM115 (closed in stop)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        self._file.seek(0)
        return int(self._file.read().split()[1]) * self.PAGE

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def start(self) -> PeakRSS:
        self.peak = self.rss()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self._file.close()
        return self.peak


def current_rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PeakRSS.PAGE


def body_and_head_params(model) -> tuple[int, int]:
    """(parameters outside the embedding and output layers, parameters of the output layer)."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - head.numel() - (embed.numel() if embed is not head else 0), head.numel()


def load_rows(spec) -> list[dict]:
    return json.loads(Path(spec["data"]).read_text())


def run_kltd(spec) -> dict:
    import torch

    from kltd.data.addition import Example
    from kltd.data.order import ExampleOrder
    from kltd.spec.config import Config, validate
    from kltd.train.models import load_pair
    from kltd.train.trainer import Trainer, seed_everything

    case = spec["case"]
    total = spec["warmup"] + spec["steps"]
    cfg = Config()
    cfg.seed = SEED
    cfg.model.teacher, cfg.model.student, cfg.model.device = spec["teacher"], spec["student"], "cpu"
    cfg.cache.teacher = "off"  # the teacher is scored live, as TRL does
    cfg.prefix.source, cfg.trajectory.supervisor = ("student", "student") if case == "opd" else ("fixed", "expert")
    cfg.trainer.batch_size, cfg.trainer.max_steps = spec["batch_size"], total
    cfg.trainer.lr, cfg.trainer.warmup_steps, cfg.trainer.min_lr_ratio = LR, 0, 1.0  # constant lr, like TRL below
    cfg.trainer.weight_decay, cfg.trainer.max_grad_norm = 0.0, 1.0
    cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p = spec["max_new_tokens"], 1.0, 1.0
    validate(cfg)
    seed_everything(SEED)
    pair = load_pair(spec["teacher"], spec["student"], device="cpu")
    examples = [Example(r["prompt"], r["response"], 0) for r in load_rows(spec)]
    # the data file's order, batch after batch, exactly as the TRL runs read it (sequential samplers)
    trainer = Trainer(cfg, pair, examples, order=ExampleOrder(len(examples), SEED, shuffle=False))
    gc.collect()
    baseline = current_rss()
    for _ in range(spec["warmup"]):
        trainer.step()
    meter = PeakRSS().start()
    times, trained, real = [], [], []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        stats = trainer.step()
        times.append(time.perf_counter() - start)
        trained.append(stats.trained_tokens)
        real.append(stats.real_tokens)  # summed over the step's scoring calls (a batch may be split by length)
    peak = meter.stop()
    return dict(times=times, trained=trained, real_tokens=real,
                params={"student": body_and_head_params(pair.student), "teacher": body_and_head_params(pair.teacher)},
                fused=trainer.can_fuse(), baseline=baseline, peak=peak, threads=torch.get_num_threads())


def run_trl(spec) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    setup = spec["case"]
    gc_on = not setup.endswith("_nogc")
    total = spec["warmup"] + spec["steps"]
    torch.manual_seed(SEED)
    random.seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(spec["student"], local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32, local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32, local_files_only=True)
    rows = load_rows(spec)
    need = spec["batch_size"] * total
    rows = (rows * (need // len(rows) + 1))[:need]  # one pass, in file order: the batches kltd gets
    common = dict(
        output_dir=spec["workdir"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        max_steps=total, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=SEED,
        dataloader_num_workers=0, gradient_checkpointing=gc_on, train_sampling_strategy="sequential",
    )
    counts = []  # (real tokens, supervised tokens) per micro-batch, read from the loss inputs

    if setup.startswith("distill"):
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(**common, beta=1.0, max_completion_length=spec["max_new_tokens"],
                                    temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False)
        dataset = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer)

        def count(inputs):
            completion = int(inputs["completion_mask"].sum())
            return int(inputs["prompt_mask"].sum()) + completion, completion
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        lmbda, beta = (1.0, 1.0) if setup.startswith("gkd1") else (0.0, 0.0)
        config = GKDConfig(**common, lmbda=lmbda, beta=beta, temperature=1.0, max_new_tokens=spec["max_new_tokens"])
        eos = tokenizer.eos_token_id
        data = []
        for r in rows:  # prompt + response + EOS, loss on response + EOS: kltd's fixed states exactly
            p = tokenizer.encode(r["prompt"], add_special_tokens=False)
            y = tokenizer.encode(r["response"], add_special_tokens=False) + [eos]
            # "prompt" is only read by the collator when input_ids are absent; it must exist all the same
            data.append({"prompt": r["prompt"], "input_ids": p + y, "completion_mask": [0] * len(p) + [1] * len(y)})
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                             train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer)

        def count(inputs):
            return int(inputs["attention_mask"].sum()), int((inputs["labels"][:, 1:] != -100).sum())

    plain_compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **k):
        counts.append(count(inputs))
        return plain_compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = counting_compute_loss
    trainer.log = lambda *a, **k: None  # no logging of any kind (report_to=[] still prints end-of-train metrics)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.meter = [], None

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if len(self.ends) == spec["warmup"]:
                self.meter = PeakRSS().start()

    clock = Clock()
    trainer.add_callback(clock)
    gc.collect()
    baseline = current_rss()
    trainer.train()
    peak = clock.meter.stop()
    ends = clock.ends
    times = [b - a for a, b in zip(ends[spec["warmup"] - 1 : -1], ends[spec["warmup"] :], strict=True)]
    timed = counts[spec["warmup"] :]
    return dict(times=times, trained=[s for _, s in timed], real_tokens=[a for a, _ in timed],
                params={"student": body_and_head_params(student), "teacher": body_and_head_params(teacher)},
                gradient_checkpointing=gc_on, baseline=baseline, peak=peak, threads=torch.get_num_threads())


def worker(spec: dict) -> dict:
    import warnings

    import torch

    warnings.filterwarnings("ignore")  # deprecation chatter from transformers/TRL; nothing the numbers depend on
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["system"] == "kltd" or spec.get("trl_keep_freed_memory"):  # what `kltd train` applies at its entry point
        from kltd.fast.memory import keep_freed_memory

        keep_freed_memory()
    result = run_kltd(spec) if spec["system"] == "kltd" else run_trl(spec)
    return {**spec, **result}


# ---------------------------------------------------------------------------------------------------------
# Orchestration (main process)


def run_one(spec: dict, in_process: bool) -> dict:
    if in_process:
        return worker(spec)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker failed: {spec['system']}:{spec['case']} at scale {spec['scale']}")
    return json.loads(lines[-1][len("RESULT ") :])


def show(rep: int, name: str, r: dict, extra: str = "") -> None:
    print(f"  round {rep + 1}: {name:<30} {statistics.median(r['times']):7.3f} s/step"
          f"  peak +{(r['peak'] - r['baseline']) / 2**20:7.0f} MB{extra}", flush=True)


def matmul_gflops(n: int = 1024, seconds: float = 1.5) -> float:
    """Best observed fp32 GEMM rate (all of torch's threads), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best / 1e9


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def parity(scale: Scale) -> list[tuple[str, float, float, float]]:
    """One batch, one set of logits: kltd's loss values against TRL's loss functions."""
    import torch
    from trl.experimental.gkd import GKDTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from kltd.spec.config import Config
    from kltd.objectives.divergences import DivergenceSpec
    from kltd.objectives.losses import trajectory_loss
    from kltd.train.models import load_pair
    from kltd.rollout.batch import position_ids_from_mask
    from kltd.rollout.scoring import Scorer
    from kltd.data.addition import Example
    from kltd.train.trainer import Trainer, seed_everything

    seed_everything(SEED)
    pair = load_pair(scale.teacher, scale.student, device="cpu")
    rows = json.loads(Path(scale.data).read_text())[: scale.batch_size]
    examples = [Example(r["prompt"], r["response"], 0) for r in rows]
    generalized_jsd = GKDTrainer.generalized_jsd_loss
    out = []
    for prefix, trajectory in (("fixed", "expert"), ("student", "student")):
        cfg = Config()
        cfg.prefix.source, cfg.trajectory.supervisor, cfg.cache.teacher = prefix, trajectory, "off"
        cfg.sampling.max_new_tokens = scale.max_new_tokens
        trainer = Trainer(cfg, pair, examples)
        batch, _ = trainer.states.build(examples, torch.Generator().manual_seed(SEED))
        targets, mask = batch.responses.tokens, batch.supervised
        labels = targets.masked_fill(~mask, -100)
        n, tokens = targets.shape[1], int(mask.sum())
        positions = position_ids_from_mask(batch.attention_mask)
        with torch.no_grad():
            s_logits, t_logits = Scorer().logits(pair.student, batch), Scorer().logits(pair.teacher, batch)
            # TRL's side gets the models' own forward ([B, n, H] at the response states), as TRL computes it
            s_hidden, t_hidden = (m.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                               position_ids=positions).last_hidden_state[:, -(n + 1) : -1]
                                  for m in (pair.student, pair.teacher))
        where = f"{prefix} states"
        default = "forward_kl" if trajectory == "expert" else "reverse_kl"
        beta_default = 0.0 if trajectory == "expert" else 1.0
        for beta in (0.0, 0.5, 1.0):
            trl = float(generalized_jsd(s_logits, t_logits, labels=labels, beta=beta))
            mine = float(trajectory_loss(s_logits, t_logits, targets, mask, trajectory=trajectory,
                                         spec=DivergenceSpec("jsd", beta=beta)))
            out.append((f"{where}: kltd trajectory_loss jsd({beta}) vs TRL generalized_jsd_loss", mine, trl,
                        rel(mine, trl)))
            if beta == beta_default:
                mine = float(trajectory_loss(s_logits, t_logits, targets, mask, trajectory=trajectory))
                out.append((f"{where}: kltd trajectory_loss {default} vs TRL generalized_jsd_loss({beta})", mine,
                            trl, rel(mine, trl)))
                # the loss each trainer actually trains with: kltd's fused head vs DistillationTrainer's chunks
                mine = float(trainer.loss(batch, float(tokens))[0].detach())
                with torch.no_grad():
                    theirs = float(_chunked_divergence_loss(
                        s_hidden, t_hidden, pair.student.get_output_embeddings().weight,
                        pair.teacher.get_output_embeddings().weight, mask.long(), beta)[0])
                path = "fused" if trainer.can_fuse() else "logits"
                out.append((f"{where}: kltd Trainer.loss ({path}) vs TRL generalized_jsd_loss({beta})", mine, trl,
                            rel(mine, trl)))
                out.append((f"{where}: kltd Trainer.loss vs TRL DistillationTrainer chunked loss({beta})", mine,
                            theirs, rel(mine, theirs)))
    return out


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    import trl

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, trl {trl.__version__}, python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (>= 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating rounds (kltd, then TRL in both settings) per setup (default 3; 1 with --quick)")
    parser.add_argument("--scales", default="toy,32k", help="comma-separated: toy, 2k, 32k")
    parser.add_argument("--toy-teacher", default=str(REPO / "kltd" / "assets" / "toy" / "teacher"))
    parser.add_argument("--toy-student", default=str(REPO / "kltd" / "assets" / "toy" / "student"))
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and sizes, 1 repeat, runs in this process: a smoke test, not a benchmark")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every run (default: torch's own choice, one per core; 1 with --quick)")
    parser.add_argument("--trl-setups", type=lambda text: text.split(","),
                        help="only these TRL setups (comma-separated, e.g. gkd1_nogc,gkd0_nogc, the fastest in "
                             "docs/performance.md); default: all, the ratio then against the fastest measured")
    parser.add_argument("--json", help="also write every run to this file (re-print it with --report)")
    parser.add_argument("--report", metavar="JSON", help="print the report of a run saved with --json; run nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        try:
            result = worker(spec)
        except Exception:  # noqa: BLE001 (reported, then the worker fails)
            traceback.print_exc()
            raise SystemExit(1) from None
        print("RESULT " + json.dumps(result), flush=True)
        return
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
            print(f"\n[{scale.name}] {scale.note}; batch {scale.batch_size}, max_new_tokens {scale.max_new_tokens}",
                  flush=True)
            for rep in range(args.repeats):
                # TRL's two settings take turns at being right after the kltd run they are paired with
                settings = list(TRL_SETTINGS) if rep % 2 == 0 else list(reversed(TRL_SETTINGS))
                for case, setups in TRL_SETUPS.items():
                    for setup in [s for s in setups if args.trl_setups is None or s in args.trl_setups]:
                        base = dict(scale=scale.name, teacher=scale.teacher, student=scale.student, data=scale.data,
                                    batch_size=scale.batch_size, max_new_tokens=scale.max_new_tokens,
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
        gflops.append(matmul_gflops(seconds=0.3 if args.quick else 1.5))
        loads.append(os.getloadavg())
        print(f"load average after: {' '.join(f'{x:.2f}' for x in loads[-1])}")
        data = {"machine": machine_line(), "command": " ".join(sys.argv), "gflops": gflops, "loadavg": loads,
                "cpu_count": os.cpu_count(),
                "parity": parity_rows, "runs": runs, "scales": [asdict(s) for s in scales], "args": vars(args)}
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1))
        report(data)


if __name__ == "__main__":
    main()
