"""A LoRA student (model.lora.r > 0) through the real CLI: its checkpoints hold the adapter in peft's format, a run
killed with SIGKILL and resumed ends bit-identical to the uninterrupted one, and its results load where they should:
adapter/ with peft onto model.student, the merged checkpoint/ (model.lora.save_merged=true) in transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.app.test_faults import TINY, finished_run, history, resumed_after_kill, steps_saved
from tests.app.test_rl_resume import untimed
from tests.support.tolerances import forward_bound

pytest.importorskip("peft")

# dropout on the adapter's input: its random draws must resume too
LORA = [*TINY, "data=addition", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.1",
        "model.lora.save_merged=true"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir, out = finished_run(*LORA, cwd=tmp_path_factory.mktemp("straight"))
    assert "student by its own forward and decoder: it carries a LoRA adapter (model.lora.r=4)" in out.stdout
    return run_dir


def adapter_weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_checkpoints_hold_the_adapter_and_the_run_leaves_adapter_and_merged_model(straight):
    last = straight / "checkpoints" / f"step-{steps_saved(straight)[-1]:06d}"
    assert (last / "adapter" / "adapter_config.json").is_file() and not (last / "model.safetensors").exists()
    saved = load_file(str(last / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    assert {k: torch.equal(v, adapter_weights(straight)[k]) for k, v in saved.items()} == {k: True for k in saved}
    summary = json.loads((straight / "metrics.json").read_text())
    assert summary["adapter"] == str(straight / "adapter") and summary["checkpoint"] == str(straight / "checkpoint")
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # the adapter trained
    from kltd.train.models import check_model_reference, resolve_model_path

    # the merged student is what model.student=RUN_DIR and kltd eval target=RUN_DIR read
    assert check_model_reference(str(straight)) is None and resolve_model_path(str(straight)).endswith("checkpoint")


def test_the_merged_checkpoint_loads_in_transformers_and_computes_what_the_adapter_does(straight):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kltd.train.models import resolve_model_path

    merged = AutoModelForCausalLM.from_pretrained(str(straight / "checkpoint")).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy/student"))
    adapted = PeftModel.from_pretrained(base, str(straight / "adapter")).eval()
    tokens = torch.randint(2, 17, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(tokens).logits, adapted(tokens).logits
    # two float32 evaluations of one forward (the merged weight against W x + s B A x: a few roundings more)
    bound = forward_bound(merged.config.to_dict(), extra_terms=2 * 4 + 2)
    assert float((a - b).abs().max()) <= bound * max(1.0, float(b.abs().max()))
    before = AutoModelForCausalLM.from_pretrained(resolve_model_path("toy/student")).eval()
    with torch.no_grad():
        assert float((before(tokens).logits - b).abs().max()) > 100 * bound  # it is not the base model


def test_killed_and_resumed_is_bit_identical(straight, tmp_path):
    run_dir = tmp_path / "run"
    summary = resumed_after_kill(3, tmp_path, LORA, run_dir)
    theirs = json.loads((straight / "metrics.json").read_text())
    assert summary["status"] == "completed"
    for key in ("eval_after", "final_loss", "tokens", "compute"):
        assert summary[key] == theirs[key], key
    mine, straight_adapter = adapter_weights(run_dir), adapter_weights(straight)
    assert mine.keys() == straight_adapter.keys() and all(torch.equal(mine[k], straight_adapter[k]) for k in mine)
    merged, straight_merged = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (run_dir, straight))
    assert merged.keys() == straight_merged.keys()
    assert all(torch.equal(merged[k], straight_merged[k]) for k in merged)
    assert history(run_dir) == history(straight)


# an RL stage after the distillation, with the starting adapter as the KL reference (rl.kl_weight) and two epochs
LORA_GRPO = [*LORA, "trainer.max_steps=3", "rl=grpo", "rl.steps=4", "rl.group_size=4", "rl.batch_size=8",
             "rl.kl_weight=0.1", "rl.epochs=2", "trajectory=expert"]


def test_an_rl_stage_trains_the_adapter_and_a_kill_inside_it_resumes_bit_identical(tmp_path):
    (tmp_path / "straight").mkdir()
    straight, out = finished_run(*LORA_GRPO, cwd=tmp_path / "straight")
    assert "RL stage: GRPO for 4 steps after step 3" in out.stdout
    summary = json.loads((straight / "metrics.json").read_text())
    assert summary["method"].endswith("→ GRPO") and "lora(4)" in summary["method"]
    # before_rl/ holds the starting adapter; the RL stage moved it
    start_adapter = load_file(str(straight / "before_rl" / "adapter_model.safetensors"))
    final = adapter_weights(straight)
    assert start_adapter.keys() == final.keys() and any(not torch.equal(start_adapter[k], final[k]) for k in final)
    assert any(row.get("rl/loss") is not None for row in history(straight))

    run_dir = tmp_path / "resumed"
    # killed after two RL steps: the reference is read back from before_rl/
    resumed = resumed_after_kill(5, tmp_path, LORA_GRPO, run_dir)
    for key in ("eval_after_distillation", "eval_after", "final_loss", "tokens", "compute"):
        assert resumed[key] == summary[key], key
    mine = adapter_weights(run_dir)
    assert mine.keys() == final.keys() and all(torch.equal(mine[k], final[k]) for k in mine)
    assert untimed(run_dir) == untimed(straight)
