"""The execution plan decides, once per job, how each model runs; these are its choices on tiny real models."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kltd.rollout.plan import plan_for
from kltd.schema.config import Config
from tests.support.tiny_models import tiny_architecture


@pytest.fixture(scope="module")
def llama():
    return tiny_architecture("llama")[0]


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=20)).eval()


def config(**changes) -> Config:
    cfg = Config()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def test_the_llama_family_runs_on_kltds_fast_paths(llama):
    plan = plan_for(config(prefix__source="student"), llama, llama)
    assert all(route.packed and route.decoder == "lean" for route in plan.training.values())
    assert plan.fused_head and plan.length_groups == 1  # both packed: nothing to gain from length groups
    assert plan.samplers == ("student",) and not plan.teacher_cache
    assert plan.evaluation.student.packed and plan.evaluation.keep_sampled_logits
    line = plan.line()
    assert line.startswith("plan: scoring student packed, teacher packed; loss fused head") and "\n" not in line
    assert "states sampled: student by the lean decoder" in line


def test_another_architecture_runs_on_its_own_forward(llama, gpt2):
    plan = plan_for(config(prefix__source="student"), gpt2, llama)
    assert plan.training["student"] == plan.training["student"].__class__(packed=False, decoder="forward")
    assert plan.training["teacher"].packed and plan.fused_head  # GPT-2's output layer is a plain linear map
    assert plan.length_groups == 4  # not both packed: rows of similar length are scored together


@pytest.mark.parametrize("changes,student_packed,fused,groups", [
    ({"trainer__packed_forward": False}, False, True, 4),
    ({"trainer__gradient_checkpointing": True}, False, True, 4),  # checkpointing lives in the model's own forward
    ({"trainer__fused_head": False}, True, False, 4),
    ({"loss__kl_prefix_weight": 1.0, "loss__normalization": "sequence"}, True, False, 1),  # rows coupled
    ({"loss__estimator": "sampled_k2", "trajectory__supervisor": "student"}, True, False, 4),
])
def test_the_switches_and_the_loss_choose_the_paths(llama, changes, student_packed, fused, groups):
    plan = plan_for(config(prefix__source="student", **changes), llama, llama)
    assert (plan.training["student"].packed, plan.fused_head, plan.length_groups) == (student_packed, fused, groups)


def test_vllm_samples_only_for_the_model_that_writes_the_states(llama):
    plan = plan_for(config(prefix__source="teacher", sampling__backend="vllm"), llama, llama)
    assert plan.training["teacher"].decoder == "vllm" and plan.training["student"].decoder == "lean"
    # the evaluation samples each model as training does: the teacher through the engine, the student with kltd's
    assert plan.evaluation.teacher.decoder == "vllm" and plan.evaluation.student.decoder == "lean"


def test_the_evaluation_samples_the_student_through_vllm_only_while_the_engine_is_current(llama):
    every_step = plan_for(config(prefix__source="student", sampling__backend="vllm"), llama, llama)
    assert every_step.evaluation.student.decoder == "vllm" and every_step.evaluation.teacher.decoder == "lean"
    stale = plan_for(config(prefix__source="student", sampling__backend="vllm", sampling__vllm_sync_every=3),
                     llama, llama)
    assert stale.evaluation.student.decoder == "lean"  # weights up to 2 steps old at an evaluation: kltd's decoder
    alone = plan_for(config(sampling__backend="vllm"), llama, llama, evaluation_only=True)  # kltd eval, fixed prefix
    assert alone.evaluation.student.decoder == "vllm"


def test_fixed_states_read_the_teacher_cache_and_the_evaluation_can_run_on_own_forwards(llama):
    plan = plan_for(config(sampling__lean_decoder=False), llama, llama)
    assert plan.teacher_cache and plan.samplers == ()
    assert not plan.evaluation.student.packed and plan.evaluation.student.decoder == "forward"
    assert not plan.evaluation.keep_sampled_logits
    assert plan_for(config(cache__teacher="off"), llama, llama).teacher_cache is False
