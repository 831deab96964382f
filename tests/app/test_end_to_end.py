"""End to end through the real CLI: a multirun over the four corners on a tiny budget."""

import json
import os
import subprocess
import sys

import pytest

TINY = [
    "trainer.max_steps=2", "trainer.batch_size=4", "trainer.log_every=1", "trainer.progress=false",
    "eval.num_prompts=6", "eval.batch_size=6", "data.n_train=64", "data.n_eval=16", "model.device=cpu",
]


def kltd(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    # a limit for a hung run only (900 s, as the other CLI tests): a busy machine runs the 4-job sweep slowly
    return subprocess.run([sys.executable, "-m", "kltd.app.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def corners(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweep")
    out = kltd("train", "-m", "prefix=fixed,student", "trajectory=expert,student", *TINY, f"hydra.sweep.dir={sweep}",
               cwd=sweep)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    return {json.loads((r / "metrics.json").read_text())["method"]: r for r in runs}


def test_four_corners_each_finish_with_their_names(corners):
    assert set(corners) == {"SFT", "Offline RL", "DAgger", "OPD"}
    for method, run_dir in corners.items():
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["status"] == "completed"
        assert summary["steps"] == 2
        assert summary["sweep"] == run_dir.parent.name
        for phase in ("eval_before", "eval_after"):
            for key in ("accuracy", "reverse_kl_student_states", "forward_kl_teacher_states"):
                assert key in summary[phase]
            assert 0.0 <= summary[phase]["accuracy"] <= 1.0
            assert summary[phase]["reverse_kl_student_states"] >= 0
            assert summary[phase]["forward_kl_teacher_states"] >= 0
        assert summary["method_slug"] in run_dir.name


def test_state_sources_show_in_the_token_counts(corners):
    for method, run_dir in corners.items():
        tokens = json.loads((run_dir / "metrics.json").read_text())["tokens"]
        on_policy = method in ("DAgger", "OPD")
        assert (tokens["student_generated"] > 0) == on_policy
        assert tokens["teacher_generated"] == 0
        assert tokens["scored"] >= tokens["trained"] > 0


def test_local_files_are_complete(corners):
    run_dir = corners["OPD"]
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "train/loss" in l] == [1, 2]
    assert any("eval/accuracy" in l for l in lines)
    assert (run_dir / ".hydra" / "config.yaml").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    AutoTokenizer.from_pretrained(run_dir / "checkpoint")


@pytest.mark.parametrize("method,prefix,trajectory", [("Offline RL", "fixed", "student"), ("OPD", "student", "student")])
def test_each_job_of_a_one_process_sweep_equals_the_job_run_alone(corners, tmp_path, method, prefix, trajectory):
    """The sweep ran its four jobs in one process; a later job must not inherit anything from an earlier one
    (threads, cached weights, random state). The same job alone, in a fresh process, gives the same numbers."""
    sweep = corners[method].parent
    run_dir = tmp_path / "alone"
    out = kltd("train", f"prefix={prefix}", f"trajectory={trajectory}", *TINY, f"hydra.run.dir={run_dir}",
               f"cache.dir={sweep / 'outputs' / 'cache'}", cwd=tmp_path)  # the teacher cache the sweep filled
    assert out.returncode == 0, out.stderr[-3000:]
    alone = json.loads((run_dir / "metrics.json").read_text())
    in_sweep = json.loads((corners[method] / "metrics.json").read_text())
    # exactly equal: the same job does the same float32 operations in the same order (one thread either way,
    # kltd.train.threads), so any difference is something the earlier jobs left behind
    assert alone["final_loss"] == in_sweep["final_loss"]
    assert alone["eval_before"] == in_sweep["eval_before"] and alone["eval_after"] == in_sweep["eval_after"]
    assert alone["tokens"] == in_sweep["tokens"]


def test_warm_teacher_cache_means_no_teacher_passes(tmp_path):
    """Two fixed-prefix cells sharing a cache: the second asks the teacher nothing during training."""
    cache = tmp_path / "cache"
    passes = {}
    for name, trajectory in (("sft", "expert"), ("offline-rl", "student")):
        run_dir = tmp_path / name
        out = kltd("train", "prefix=fixed", f"trajectory={trajectory}", *TINY, f"cache.dir={cache}",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        passes[name] = json.loads((run_dir / "metrics.json").read_text())["teacher_forward_passes"]
    assert passes["sft"] > 0 and passes["offline-rl"] == 0


def test_the_sweep_ends_with_a_comparison(corners):
    sweep = next(iter(corners.values())).parent
    for name in ("results.md", "results.csv", "matrix_accuracy.png", "learning_curves.png"):
        assert (sweep / name).is_file(), name
    csv_rows = (sweep / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4
    table = (sweep / "results.md").read_text()
    for method in ("SFT", "Offline RL", "DAgger", "OPD"):
        assert method in table


def test_compare_reproduces_the_sweep_files_from_the_directory_alone(corners, tmp_path):
    sweep = next(iter(corners.values())).parent
    out = kltd("compare", str(sweep), "--metric", "accuracy,reverse_kl_student_states", "--out", str(tmp_path),
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "results.csv").read_text() == (sweep / "results.csv").read_text()
    assert "OPD" in out.stdout and "DAgger" in out.stdout
