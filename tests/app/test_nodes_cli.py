"""`kltd train` on several machines, as two "nodes" on this one over loopback: two commands with
distributed.nnodes=2 and node_rank 0 and 1 take the steps of one process (to the float32 bounds
tests/train/test_data_parallel.py derives for a run split across processes), and resume from the
directory they share."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from kltd.app.compose import config_dir, to_typed
from kltd.train.data_parallel import free_port
from tests.train.test_data_parallel import Run, assert_same_run, cut_after, trained, training_rows

KLTD = [sys.executable, "-m", "kltd.app.cli", "train"]
ENV = {**os.environ, "WANDB_MODE": "disabled"}
# tests/train/test_data_parallel.config's run (the addition task: Config's own default), as command-line settings
RUN = ["data=addition", "prefix=fixed", "trajectory=expert", "model.device=cpu", "wandb.mode=disabled",
       "data.n_train=200", "data.n_eval=8", "eval.num_prompts=4", "eval.batch_size=4", "eval.pass_k=2", "eval.before=false",
       "trainer.max_steps=5", "trainer.batch_size=8", "trainer.log_every=1", "trainer.progress=false",
       "trainer.lr=3e-3", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=5", "distributed.backend=gloo"]


def two_nodes(run_dir: Path, cache: Path) -> list[str]:
    """The run on two nodes of one process each; returns each node's output (node 1's first)."""
    shared = [*RUN, f"cache.dir={cache}", "distributed.nnodes=2", f"distributed.rdzv_endpoint=127.0.0.1:{free_port()}",
              f"hydra.run.dir={run_dir}"]
    nodes = [subprocess.Popen([*KLTD, *shared, f"distributed.node_rank={rank}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=run_dir.parent, env=ENV) for rank in (1, 0)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    return [out for out, _ in outputs]


def test_two_nodes_take_the_steps_of_one_process_and_resume_as_they_would_have_gone_on(tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=[*RUN, f"cache.dir={tmp_path / 'c1'}"]))
    one = trained(cfg, tmp_path / "one")
    run_dir = tmp_path / "two"
    said = " ".join(two_nodes(run_dir, tmp_path / "c2")[0].split())  # rich wraps long lines
    two = Run(cfg, run_dir, training_rows(run_dir), load_file(str(run_dir / "checkpoint" / "model.safetensors")))
    assert_same_run(one, two)
    # node 0 writes the run directory; node 1 only its own corner of it (its claim, Hydra's files, worker logs)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in (run_dir / "node-1").iterdir()) == [".hydra", ".lock", "train_command.log",
                                                                      "worker-logs"]
    assert "node 1 of 2: its processes' share is trained; node 0 holds the run's results" in said
    # the same run stopped after step 3: both nodes read the step-3 checkpoint of the directory they share, and
    # the same processes take the same steps in the same order of float32 operations: equal to the bit
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    cut_after(cut, 3)
    two_nodes(cut, tmp_path / "c2")
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == 3
    resumed = load_file(str(cut / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(two.weights[k], resumed[k]) for k in two.weights)


@pytest.mark.parametrize("args,env,message", [
    (["distributed.nnodes=2", "distributed.node_rank=0", "distributed.rdzv_endpoint=127.0.0.1:29500"], {},
     "give them all the same hydra.run.dir"),
    (["-m", "seed=0,1", "distributed.nnodes=2", "distributed.node_rank=0",
      "distributed.rdzv_endpoint=127.0.0.1:1"], {},
     "a sweep on several machines"),
    (["distributed.nnodes=2", "distributed.node_rank=2", "distributed.rdzv_endpoint=h:1"], {}, "is outside 0..1"),
    ([], {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]"},
     "not an srun step"),
])
def test_a_multi_node_command_that_cannot_run_is_one_line_before_anything_starts(tmp_path, args, env, message):
    out = subprocess.run([*KLTD, *args], capture_output=True, text=True, cwd=tmp_path, env={**ENV, **env},
                         timeout=300)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "outputs").exists()  # nothing was created
