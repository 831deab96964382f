"""`sampling.backend=vllm` in a training run (needs the vllm extra; skipped without it): OPD with the student's
samples drawn by vLLM reaches the metrics of the same run on kltd's sampler, within seed noise, and the
engine is given the student's weights on schedule."""

import importlib.util
import json
from pathlib import Path

import pytest

from kltd.schema.config import Config, ConfigError
from kltd.train.job import train_job
from tests.support.tiny_models import make_head64_pair

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="the vllm extra is not installed")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    """Toy-task teacher and student with head_dim 64 (vLLM's CPU attention refuses the toy pair's 16)."""
    return make_head64_pair(tmp_path_factory.mktemp("pair"))


def config(pair, backend: str, **sampling) -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor = "student", "student"
    cfg.model.teacher, cfg.model.student = pair
    cfg.model.device, cfg.wandb.mode, cfg.cache.teacher = "cpu", "disabled", "off"
    cfg.data.n_train, cfg.data.n_eval = 400, 64
    cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k = 64, 64, 1
    cfg.sampling.max_new_tokens = cfg.eval.max_new_tokens = 24
    cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.trainer.lr = 30, 16, 3e-3
    cfg.trainer.log_every, cfg.trainer.progress, cfg.trainer.save_checkpoint = 1, False, False
    cfg.sampling.backend = backend
    for key, value in sampling.items():
        setattr(cfg.sampling, key, value)
    return cfg


def staleness(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/sampler_staleness"] for row in rows if "train/sampler_staleness" in row]


@needs_vllm
def test_opd_on_vllm_samples_reaches_the_metrics_of_kltds_sampler(pair, tmp_path):
    ours = train_job(config(pair, "kltd"), tmp_path / "kltd")
    theirs = train_job(config(pair, "vllm"), tmp_path / "vllm")
    before, a, b = ours["eval_before"], ours["eval_after"], theirs["eval_after"]
    key = "reverse_kl_student_states"
    # the evaluation samples the student as training does: through the engine, another stream of the same model
    assert theirs["plan"]["evaluation"]["student"]["decoder"] == "vllm"
    assert ours["plan"]["evaluation"]["student"]["decoder"] != "vllm"
    assert abs(theirs["eval_before"][key] - before[key]) < 0.15 * before[key], (before[key], theirs["eval_before"])
    assert a[key] < 0.8 * before[key] and b[key] < 0.8 * before[key]  # both learned
    assert abs(a[key] - b[key]) < 0.15 * before[key], (before[key], a[key], b[key])
    assert staleness(tmp_path / "vllm") == [0.0] * 30  # weights pushed after every step
    assert staleness(tmp_path / "kltd") == []


@needs_vllm
def test_a_lora_students_engine_holds_the_merged_weights_after_each_step(pair):
    """model.lora.r > 0: the engine runs the plain architecture, and the trainer gives it the merged weights (base +
    adapter) after every optimiser step: its next-token log-probabilities are then the adapted student's, not the
    base's, to float32's bound for two implementations of one forward."""
    pytest.importorskip("peft")
    import torch

    from kltd.data.addition import make_splits
    from kltd.train.models import load_model, load_pair
    from kltd.train.trainer import Trainer
    from tests.rollout.test_vllm_sampler import engine_logprobs, hf_logprobs
    from tests.support.tolerances import forward_bound

    cfg = config(pair, "vllm")
    cfg.model.lora.r, cfg.model.lora.alpha, cfg.trainer.lr = 8, 16.0, 1e-2
    loaded = load_pair(cfg.model.teacher, cfg.model.student, device="cpu", lora=cfg.model.lora)
    trainer = Trainer(cfg, loaded, make_splits(0, 64, 4)[0])
    try:
        for _ in range(3):
            trainer.step()
        engine = trainer.states.student
        assert engine.pushes == 3 and engine.staleness(trainer.steps_done) == 0
        prompts = ["1+2=", "12+45+7+88=", "99+9+9=", "40+2+1="]
        student = trainer.student.eval()
        adapted, base = hf_logprobs(student, loaded.tokenizer, prompts), hf_logprobs(
            load_model(cfg.model.student), loaded.tokenizer, prompts)
        assert float((adapted - base).abs().max()) > 1e-3  # the adapter moved the student
        got = engine_logprobs(engine, loaded.tokenizer, prompts)[:, : adapted.shape[1]]
        tol = forward_bound(student.config.to_dict(), extra_terms=student.config.vocab_size + 8)
        torch.testing.assert_close(got, adapted, atol=tol, rtol=0)
    finally:
        trainer.close()


@needs_vllm
def test_weights_pushed_every_k_steps_record_their_staleness(pair, tmp_path):
    cfg = config(pair, "vllm", vllm_sync_every=3)
    cfg.trainer.max_steps = 6
    summary = train_job(cfg, tmp_path / "run")
    assert staleness(tmp_path / "run") == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    # an engine behind the student's weights would evaluate a stale student: kltd's decoder evaluates instead
    assert summary["plan"]["evaluation"]["student"]["decoder"] != "vllm"


@needs_vllm
def test_an_entropy_gated_horizon_reaches_the_engine(pair, tmp_path):
    """H_min = 0 opens the gate at every evaluation: the engine's samples grow with the horizon."""
    cfg = config(pair, "vllm", length_schedule="entropy_gated", lengths=[4, 8, 16], entropy_min=0.0)
    cfg.trainer.max_steps, cfg.eval.every, cfg.eval.num_prompts = 6, 2, 8
    summary = train_job(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if "train/loss" in row]
    assert [row["train/max_new_tokens"] for row in trained] == [4, 4, 8, 8, 16, 16]
    generated = [0] + [row["cost/student_tokens_generated"] for row in trained]
    per_step = [b - a for a, b in zip(generated, generated[1:])]
    assert all(n <= 16 * row["train/max_new_tokens"] for n, row in zip(per_step, trained))  # 16 rows a step
    assert max(per_step[4:]) > 16 * 4  # rows longer than the first horizon: the engine got the new one
    assert summary["horizon"]["final"] == 16


@needs_vllm
def test_grpo_samples_the_current_student_through_the_engine(pair, tmp_path):
    """After a fixed-prefix distillation (no training samples), the RL stage samples the student through vLLM, with
    its weights pushed after every step (kltd's sampler runs the same config beside it)."""
    runs = {}
    for backend in ("kltd", "vllm"):
        cfg = config(pair, backend)
        cfg.prefix.source, cfg.trajectory.supervisor, cfg.trainer.max_steps = "fixed", "expert", 2
        cfg.rl.algorithm, cfg.rl.steps, cfg.rl.group_size, cfg.rl.batch_size = "grpo", 3, 4, 16
        cfg.eval.num_prompts = 16
        runs[backend] = train_job(cfg, tmp_path / backend)
    vllm = runs["vllm"]
    assert vllm["plan"]["training"]["student"]["decoder"] == "vllm" and vllm["plan"]["rl"] == "grpo"
    assert runs["kltd"]["plan"]["training"]["student"]["decoder"] != "vllm"
    rows = [json.loads(line) for line in (tmp_path / "vllm" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "rl/loss" in row]
    assert [row["step"] for row in steps] == [3, 4, 5] and all(0 <= row["rl/reward"] <= 1 for row in steps)
    assert all(row["rl/response_length"] <= 24 for row in steps)
    assert vllm["eval_after_distillation"] and vllm["eval_after"]


@needs_vllm
def test_kltd_eval_samples_the_evaluated_model_through_vllm(pair, tmp_path):
    from kltd.schema.config import EvalRunConfig
    from kltd.train.eval_job import eval_job

    results = {}
    for backend in ("kltd", "vllm"):
        cfg = EvalRunConfig(**vars(config(pair, backend)))
        results[backend] = eval_job(cfg, tmp_path / backend)
    assert results["vllm"]["plan"]["student"]["decoder"] == "vllm"
    assert results["kltd"]["plan"]["student"]["decoder"] != "vllm"
    key = "reverse_kl_student_states"
    a, b = results["kltd"]["eval_after"][key], results["vllm"]["eval_after"][key]
    assert abs(a - b) < 0.15 * a, (a, b)  # two samplers of one model: within the run-to-run bound used above


def test_the_vllm_backend_is_refused_with_data_parallel_processes(pair):
    cfg = config(pair, "vllm")
    cfg.distributed.nproc_per_node = 2
    with pytest.raises(ConfigError, match="sampling.backend=vllm"):
        cfg.check()
    cfg.sampling.backend = "other"
    with pytest.raises(ConfigError, match="sampling.backend='other'"):
        cfg.check()


def test_what_the_vllm_backend_cannot_start_is_refused_in_one_line(pair, monkeypatch):
    from kltd.train import preflight

    cfg = config(pair, "vllm")
    toy = Config()
    toy.sampling.backend, toy.model.device, toy.prefix.source = "vllm", "cpu", "student"
    if HAVE_VLLM:
        with pytest.raises(ConfigError, match="head dimension of 32 or more; the student's is 16"):
            preflight.preflight(toy)
        preflight.preflight(cfg)  # head_dim 64: accepted
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    with pytest.raises(ConfigError, match=r"needs the vllm extra: pip install -e '.\[vllm\]'"):
        preflight.preflight(cfg)


@needs_vllm
def test_teacher_states_drawn_by_vllm_train_like_kltds_sampler(pair, tmp_path):
    """prefix=teacher: the teacher's engine draws the states (no weights pushed); the run reaches kltd's."""
    def cfg(backend):
        c = config(pair, backend)
        c.prefix.source, c.trainer.max_steps = "teacher", 20
        return c

    ours, theirs = train_job(cfg("kltd"), tmp_path / "kltd"), train_job(cfg("vllm"), tmp_path / "vllm")
    before, a, b = ours["eval_before"], ours["eval_after"], theirs["eval_after"]
    key = "forward_kl_teacher_states"
    assert a[key] < 0.8 * before[key] and b[key] < 0.8 * before[key]  # both learned on teacher states
    assert abs(a[key] - b[key]) < 0.15 * before[key], (before[key], a[key], b[key])
    assert theirs["tokens"]["teacher_generated"] > 0 and theirs["tokens"]["student_generated"] == 0
    assert staleness(tmp_path / "vllm") == []  # the teacher's weights never change


def test_the_vllm_backend_runs_one_engine(pair):
    cfg = config(pair, "vllm")
    cfg.prefix.source, cfg.prefix.other, cfg.prefix.student_fraction = "mixed", "teacher", 0.5
    with pytest.raises(ConfigError, match="one engine"):
        cfg.check()
    cfg.prefix.other = "fixed"  # only the student samples
    cfg.check()
    assert cfg.prefix.sampling_models() == ("student",)
    cfg.prefix.handoff = True  # the teacher continues the student's rows
    assert cfg.prefix.sampling_models() == ("student", "teacher")
