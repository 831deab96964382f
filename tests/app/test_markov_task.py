"""data=markov through the real CLI: a two-cell sweep writes the exact figures, `kltd compare` shows them, and a chain
the teacher does not encode is refused in one line before anything loads."""

import json
import math

import pytest

from tests.app.test_faults import run as kltd

TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.log_every=1", "trainer.progress=false",
        "eval.num_prompts=12", "eval.batch_size=12", "data.n_train=32", "data.n_eval=12", "model.device=cpu"]
# the prompts: the shipped chain's states that cannot end at once (kltd.data.markov.MarkovChain.start_ids)
STARTS = 3
EXACT = ("exact_reverse_kl", "exact_forward_kl", "exact_accepted", "exact_student_entropy_rate",
         "exact_teacher_entropy_rate", "exact_response_length", "exact_truncated")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("markov")
    out = kltd("train", "-m", "data=markov", "prefix=fixed,student", "trajectory=student", "hydra/launcher=basic",
               *TINY, f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in (root / "sweep").iterdir() if (p / "metrics.json").exists())
    return root, {json.loads((r / "metrics.json").read_text())["method"]: r for r in runs}


def test_each_run_writes_the_exact_figures(sweep):
    _, runs = sweep
    assert set(runs) == {"Offline RL", "OPD"}
    for run_dir in runs.values():
        summary = json.loads((run_dir / "metrics.json").read_text())
        assert summary["status"] == "completed" and summary["data"]["checker"] == "markov"
        for phase in ("eval_before", "eval_after"):
            figures = summary[phase]
            for key in EXACT:
                assert math.isfinite(figures[key]), (phase, key)
                assert len(figures["sets"]["heldout"]["per_question"][key]) == STARTS  # one per start state
            assert 0 <= figures["exact_accepted"] <= 1 and figures["exact_reverse_kl"] >= 0
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("eval/exact_reverse_kl" in line for line in lines)


def test_the_evaluation_before_training_is_the_recorded_students(sweep):
    from kltd.train.models import markov_dir

    _, runs = sweep
    recorded = json.loads((markov_dir() / "task.json").read_text())["models"]["student"]["exact"]
    for run_dir in runs.values():
        before = json.loads((run_dir / "metrics.json").read_text())["eval_before"]
        assert before["exact_reverse_kl"] == pytest.approx(recorded["reverse_kl"], rel=1e-9)
        assert before["exact_accepted"] == pytest.approx(recorded["student_accepted"], rel=1e-9)


def test_compare_shows_the_exact_columns_and_matrices(sweep, tmp_path):
    """Without --metric, kltd compare (and the sweep's own comparison at its end) shows the exact figures' matrices
    beside the default ones, and the flat table gains their columns."""
    root, _ = sweep
    out = kltd("compare", str(root / "sweep"), "--out", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    assert "exact_reverse_kl after training" in (root / "sweep" / "results.md").read_text()
    for column in ("exact reverse KL", "exact forward KL", "accepted (exact)", "exact_reverse_kl after training",
                   "exact_accepted after training", "reverse_kl_student_states after training"):
        assert column in table, column
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"exact_reverse_kl", "exact_accepted", "reverse_kl_student_states"} <= set(header)


@pytest.mark.parametrize("args,message", [
    (["data=markov", "data.markov.seed=0"], "data.markov.seed=0 differs from the chain model.teacher=markov/teacher "
                                            "encodes (seed=1"),
    (["data=addition", "model=markov"], "model.teacher=markov/teacher is the Markov task's chain"),
    (["data=markov", "model=toy", "eval.max_new_tokens=7"], "model.student=toy/student has another tokenizer"),
    (["model.student=toy/student"], "data=markov (the default task) walks a chain of 6 letters"),
    (["model=toy"], "name the task of the pair you chose (data=addition with model=toy"),
])
def test_a_chain_the_teacher_does_not_encode_is_refused_in_one_line(tmp_path, args, message):
    out = kltd("train", *args, *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoint").exists()
