"""sweep=paper_rl through the CLI: forward- and reverse-KL distillation on the student's states, each followed by
GRPO, and the comparison the sweep writes when it ends: each metric before and after the RL stage."""

import csv
import json

from tests.app.test_faults import run

SMALL = ["trainer.max_steps=2", "trainer.batch_size=4", "rl.steps=2", "rl.batch_size=8", "rl.group_size=4",
         "eval.num_prompts=4", "eval.batch_size=4", "eval.samples=2", "eval.pass_k=2", "data.n_train=32",
         "data.n_eval=8", "model.device=cpu", "trainer.progress=false"]


def test_sweep_paper_rl_writes_the_before_and_after_rl_comparison(tmp_path):
    sweep = tmp_path / "sweep"
    out = run("train", "sweep=paper_rl", *SMALL, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted(s["method"] for s in summaries) == ["DAgger → GRPO", "OPD → GRPO"]
    assert all(s["status"] == "completed" and s["eval_after_distillation"] and s["steps"] == 4 for s in summaries)
    report = (sweep / "results.md").read_text()
    assert "Before and after the RL stage" in report and "accuracy before RL" in report
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    for row in rows:
        summary = next(s for s in summaries if s["method"] == row["method"])
        assert float(row["accuracy_before_rl"]) == summary["eval_after_distillation"]["accuracy"]
        assert float(row["accuracy"]) == summary["eval_after"]["accuracy"]
