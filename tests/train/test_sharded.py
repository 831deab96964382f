"""A sharded student (distributed.strategy=fsdp, torch's FSDP2) against one process, on the CPU with gloo:
2 processes holding half the student each take the steps one process takes, and their checkpoints hold
whole tensors that resume anywhere."""

import json

import pytest
from safetensors.torch import load_file

from kltd.schema.config import ConfigError
from tests.train.test_data_parallel import assert_same_run, config, cut_after, trained


def fsdp(cfg):
    cfg.distributed.strategy = "fsdp"
    return cfg


def own_forward(cfg):
    """A sharded model runs through its own forward; the one-process reference then takes the same path, so
    the runs differ by the split alone (assert_same_run's float32 bounds count one forward pass)."""
    cfg.trainer.packed_forward = cfg.trainer.fused_head = cfg.sampling.lean_decoder = False
    return cfg


@pytest.mark.parametrize("prefix,trajectory,accum", [("fixed", "expert", 2), ("student", "student", 1),
                                                     ("teacher", "student", 1)])
def test_a_sharded_student_takes_the_steps_of_one_process(tmp_path, prefix, trajectory, accum):
    one = trained(own_forward(config(prefix, trajectory, nproc=1, accum=accum, cache=tmp_path / "c1")),
                  tmp_path / "one")
    two = trained(fsdp(config(prefix, trajectory, nproc=2, accum=accum, cache=tmp_path / "c2")), tmp_path / "two")
    assert_same_run(one, two)
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert summary["status"] == "completed"
    # the final checkpoint is a whole model (save_pretrained), loadable without kltd
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "checkpoint")
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in two.weights.values())


def test_a_sharded_run_resumes_in_one_process_and_a_plain_one_resumes_sharded(tmp_path):
    def cfg(sharded: bool):
        c = config("student", "student", nproc=2 if sharded else 1, steps=6, cache=tmp_path / "c")
        return fsdp(own_forward(c)) if sharded else own_forward(c)

    whole = trained(cfg(False), tmp_path / "whole")
    for first, then in ((True, False), (False, True)):
        run = tmp_path / f"from-{'sharded' if first else 'plain'}"
        trained(cfg(first), run)
        cut_after(run, 3)
        # a plain first half is whole's own three steps (the same process, the same sums); a sharded one is not
        assert_same_run(whole, trained(cfg(then), run), first_split=1 if first else 4)
        assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 3
        saved = load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors"))
        assert all(t.shape == whole.weights[k].shape for k, t in saved.items())  # whole tensors, not shards


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.distributed, "nproc_per_node", 1), "nproc_per_node=2 or more"),
    (lambda c: setattr(c.prefix, "source", "mixed"), "prefix=mixed is not built"),
])
def test_what_sharding_cannot_take_is_refused_before_anything_runs(tmp_path, change, message):
    cfg = fsdp(config("student", "student", nproc=2, cache=tmp_path))
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.check()
