"""One measured run of scripts/bench_vs_trl.py: kltd or a TRL trainer, timed step by step, with its peak memory.

A run gets a spec (scale, models, data file, batch, lengths, case or TRL setup, warm-up and timed steps) and
returns it with the step times, the trained and real tokens of each timed step, the parameter counts and
the resident memory right after setup and at its peak during the timed steps (PeakRSS). run_one runs the
spec in this process (--quick) or, for a measurement, in a fresh process of its own (this file, run with
the spec as JSON), so that peak memory and the malloc setting are per run.
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from bench_scales import SEED

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


def page_in(*models) -> None:
    """Read every weight once, so that the baseline holds the models on both sides: a model loaded from a
    mapped file is read from disk page by page as it is first used, and those pages would otherwise count
    in the peak of a side whose setup had not read them yet (kltd's, whose loading maps the files)."""
    import torch

    with torch.no_grad():
        for model in models:
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.sum()


def load_rows(spec) -> list[dict]:
    return json.loads(Path(spec["data"]).read_text())


def run_kltd(spec) -> dict:
    import torch

    from kltd.data.addition import Example
    from kltd.data.order import ExampleOrder
    from kltd.schema.config import Config, validate
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
    page_in(pair.student, pair.teacher)
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
    page_in(student, teacher)
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
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker failed: {spec['system']}:{spec['case']} at scale {spec['scale']}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    """run_one's fresh process: the spec (JSON) in, a `RESULT <json>` line out."""
    repo = str(Path(__file__).resolve().parents[1])  # kltd itself, as bench_vs_trl.py puts it on the path
    if repo not in sys.path:
        sys.path.insert(0, repo)
    spec = json.loads(sys.argv[1])
    try:
        result = worker(spec)
    except Exception:  # noqa: BLE001 (reported, then the worker fails)
        traceback.print_exc()
        raise SystemExit(1) from None
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
