"""The RL stage after distillation (rl=grpo, kltd.train.reinforce) on tiny real models: its gradient against the
stated formula, its groups, runs on the toy pair and on local Qwen3 / Llama fixtures, an RL stage alone from a
trained student, and what is refused."""

import json
from pathlib import Path

import pytest
import torch

from kltd.objectives.grpo import group_advantages
from kltd.schema.config import Config, ConfigError
from kltd.train.job import train_job
from kltd.train.reinforce import Reinforcer, reward_function
from tests.support.rewards import characters_mod_3
from tests.support.tiny_models import make_tiny_model
from tests.train.test_job import tiny_config
from tests.train.test_trainer import make_trainer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return str(make_tiny_model(root / "teacher", layers=2, seed=1)), str(make_tiny_model(root / "student", seed=2))


def reinforcer(model_dirs, reward=None, **rl) -> Reinforcer:
    trainer = make_trainer(model_dirs, prefix__source="student", trajectory__supervisor="expert", rl__algorithm="grpo",
                           rl__group_size=4, rl__batch_size=8, **{f"rl__{k}": v for k, v in rl.items()})
    return Reinforcer(trainer.cfg, trainer, reward or characters_mod_3)  # a reward that varies within groups


def test_the_on_policy_gradient_is_minus_the_advantage_weighted_score(model_dirs):
    """One update's gradient equals -sum_i A_i sum_t grad log q(y_it) / tokens, with log q summed by hand from the
    model's own forward (not kltd's scorer)."""
    rl = reinforcer(model_dirs)
    batch, _ = rl.next_states(0)
    fixed = rl.constants(batch)
    assert [e.prompt for e in batch.examples[:4]] == [batch.examples[0].prompt] * 4  # a group: one prompt
    assert len({e.prompt for e in batch.examples}) == 2
    student = rl.student
    student.zero_grad(set_to_none=True)
    tokens = float(batch.supervised.sum())
    loss, _ = rl.loss(batch, fixed, denominator=tokens)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    student.zero_grad(set_to_none=True)
    ids = torch.cat([batch.prompt_ids, batch.responses.tokens], 1)
    attention = torch.cat([batch.prompt_mask, batch.responses.mask], 1).long()
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits = student(input_ids=ids, attention_mask=attention, position_ids=positions).logits.float()
    prompt = batch.prompt_ids.shape[1]
    log_q = torch.log_softmax(logits[:, prompt - 1 : -1], -1).gather(-1, batch.responses.tokens.unsqueeze(-1))[..., 0]
    per_row = (log_q * batch.supervised).sum(1)
    advantages = group_advantages(fixed.rewards, 4, "group_mean", "std")
    (-(advantages * per_row).sum() / tokens).backward()
    theirs = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys()
    scale = max(float(g.abs().max()) for g in theirs.values())
    assert all(torch.allclose(ours[n], theirs[n], rtol=1e-4, atol=1e-5 * scale) for n in ours)
    assert torch.equal(fixed.advantages, advantages)


def test_a_constant_reward_gives_no_gradient_and_a_bad_reward_is_one_line(model_dirs):
    rl = reinforcer(model_dirs, reward=lambda texts, examples: [1.0] * len(texts))
    batch, _ = rl.next_states(0)
    loss, parts = rl.loss(batch, rl.constants(batch), denominator=float(batch.supervised.sum()))
    loss.backward()
    assert all(float(p.grad.abs().max()) == 0 for p in rl.student.parameters() if p.grad is not None)
    broken = reinforcer(model_dirs, reward=lambda texts, examples: [float("nan")] * len(texts))
    with pytest.raises(Exception, match="must give one finite number per response"):
        broken.constants(broken.next_states(0)[0])


def rl_config(**rl) -> Config:
    cfg = tiny_config(max_steps=3, log_every=1)
    cfg.trajectory.supervisor = "expert"
    cfg.rl.algorithm, cfg.rl.steps, cfg.rl.group_size, cfg.rl.batch_size = "grpo", 4, 4, 8
    for key, value in rl.items():
        setattr(cfg.rl, key, value)
    return cfg


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_distils_then_reinforces_and_keeps_both_evaluations(tmp_path):
    cfg = rl_config(kl_weight=0.1, teacher_weight=0.5, epochs=2)
    cfg.trainer.save_checkpoint = True
    summary = train_job(cfg, tmp_path / "run")
    assert summary["method"] == "DAgger → GRPO" and summary["steps"] == 7
    assert summary["eval_after_distillation"] and summary["eval_after"] and summary["rl"]["steps"] == 4
    logged = rows(tmp_path / "run")
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3]
    steps = [r for r in logged if "rl/loss" in r]
    assert [r["step"] for r in steps] == [4, 5, 6, 7]
    assert all(0 <= r["rl/reward"] <= 1 and r["rl/kl_reference"] >= 0 and r["rl/teacher_reverse_kl"] >= 0
               for r in steps)
    evaluated = [r["step"] for r in logged if "eval/avg_at_k" in r]
    assert evaluated == [0, 3, 7]  # before, after distillation, after RL
    assert (tmp_path / "run" / "before_rl" / "model.safetensors").is_file()
    costs = [r["cost/flops"] for r in logged if "cost/flops" in r]
    assert costs == sorted(costs) and costs[-1] == summary["compute"]["flops"]["total"]


def test_the_wandb_summary_holds_the_figures_before_and_after_rl(tmp_path, monkeypatch):
    from tests.support.wandb_records import read_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = rl_config(steps=1)
    cfg.trainer.max_steps, cfg.wandb.mode = 1, "offline"
    summary = train_job(cfg, tmp_path / "run")
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = read_run(record)["summary"]
    assert logged["before_rl/avg_at_k"] == summary["eval_after_distillation"]["avg_at_k"]
    assert logged["final/avg_at_k"] == summary["eval_after"]["avg_at_k"]
    assert [h["rl/reward"] for h in read_run(record)["history"] if "rl/reward" in h] == \
        [r["rl/reward"] for r in rows(tmp_path / "run") if "rl/reward" in r]


def test_an_rl_stage_alone_starts_from_a_trained_student(tmp_path):
    first = tiny_config(max_steps=2)
    first.trainer.save_checkpoint = True
    train_job(first, tmp_path / "distilled")
    cfg = rl_config()
    cfg.trainer.max_steps, cfg.model.student = 0, str(tmp_path / "distilled")  # a run directory: its checkpoint/
    summary = train_job(cfg, tmp_path / "rl")
    assert summary["steps"] == 4 and summary["eval_after_distillation"] == summary["eval_before"]
    assert [r["step"] for r in rows(tmp_path / "rl") if "rl/loss" in r] == [1, 2, 3, 4]
    train_job(tiny_config(max_steps=1), tmp_path / "no_checkpoint")  # trainer.save_checkpoint=false
    cfg.model.student = str(tmp_path / "no_checkpoint")
    with pytest.raises(Exception, match="run directory without a trained student"):
        train_job(cfg, tmp_path / "refused")


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_grpo_runs_on_real_architectures_with_their_checker(tmp_path, arch):
    from tests.support.fixtures import on_local_gsm8k_pair

    cfg = on_local_gsm8k_pair(rl_config(steps=2, max_new_tokens=8), tmp_path, arch)
    cfg.trainer.max_steps = 2
    summary = train_job(cfg, tmp_path / "run")
    steps = [r for r in rows(tmp_path / "run") if "rl/loss" in r]
    assert len(steps) == 2 and all(r["rl/response_length"] <= 8 for r in steps)
    assert "accuracy" in summary["eval_after"] and "accuracy" in summary["eval_after_distillation"]


def test_a_reward_function_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(texts, examples):\n    return [-len(t) for t in texts]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward_function("my_rewards:short", None)(["ab", "abcd"], [None, None]) == [-2, -4]
    with pytest.raises(ConfigError, match="has no function 'long'"):
        reward_function("my_rewards:long", None)
    with pytest.raises(ConfigError, match="module 'no_such_module' does not import"):
        reward_function("no_such_module:f", None)


def grpo(**changes) -> Config:
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor, cfg.rl.algorithm = "student", "expert", "grpo"
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("changes, message", [
    (dict(rl__group_size=1, rl__batch_size=4), "GRPO compares a sample with the other samples"),
    (dict(rl__batch_size=12), "not a whole number of groups of rl.group_size=8"),
    (dict(data__checker="none"), "rl.reward=checker needs an answer checker"),
    (dict(sampling__temperature=0.0), "sampling.temperature=0 \\(greedy\\)"),
    (dict(rl__temperature=0.0), "GRPO needs sampled responses"),
    (dict(distributed__nproc_per_node=8), "multiple of rl.group_size=8 x distributed.nproc_per_node=8"),
    (dict(distributed__nproc_per_node=2, distributed__strategy="fsdp"), "not built"),
    (dict(rl__reward="my_rewards.short"), "use checker .* or module:function"),
    (dict(rl__algorithm="ppo"), "rl.algorithm"),
    (dict(rl__clip_high=1.5), "rl.clip_high"),
    (dict(sampling__backend="vllm", sampling__vllm_sync_every=2), "use sampling.vllm_sync_every=1"),
])
def test_an_rl_stage_that_cannot_run_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        grpo(**changes).check()


def test_no_steps_at_all_is_refused_and_the_label_names_the_stage():
    cfg = grpo()
    cfg.check()
    assert cfg.method == "DAgger → GRPO"
    cfg.rl.algorithm, cfg.trainer.max_steps = "none", 0
    with pytest.raises(ConfigError, match="trainer.max_steps=0 trains nothing"):
        cfg.check()
