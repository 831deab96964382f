"""The four math benchmarks as evaluation sets (on local fixtures in each set's own schema), in training and in
`kltd eval`, whose results directories `kltd compare` reads beside training runs."""

import csv
import json
from pathlib import Path

from tests.app.test_your_data import kltd

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval_sets"
BENCHMARKS = ("gsm8k", "math500", "aime24", "amc23")
# each benchmark read from its fixture file, with a budget the toy pair fills in seconds
LOCAL_SETS = [o for name in BENCHMARKS for o in (f"eval_sets.{name}.source=file",
                                                 f"eval_sets.{name}.path={FIXTURES / (name + '.jsonl')}",
                                                 f"eval_sets.{name}.max_new_tokens=48")]
# the addition task's toy pair: its tokenizer reads the benchmarks' text (the default Markov pair: only its letters)
SMALL = ["data=addition", "eval.num_prompts=4", "eval.batch_size=4", "eval.pass_k=2", "eval.samples=3",
         "eval.max_new_tokens=24", "trainer.progress=false"]
ALL_SETS = "eval.sets=[heldout," + ",".join(BENCHMARKS) + "]"


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def history(run_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def test_training_evaluates_every_set_before_and_after_each_apart(tmp_path):
    run = tmp_path / "run"
    out = kltd("train", "trainer.max_steps=2", ALL_SETS, *LOCAL_SETS, *SMALL, "+data.chat_template_kwargs.a=1",
               f"hydra.run.dir={run}", f"cache.dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed"
    for when in ("eval_before", "eval_after"):
        sets = summary[when]["sets"]
        assert list(sets) == ["heldout", *BENCHMARKS]
        for name in BENCHMARKS:
            figures = sets[name]
            assert figures["samples"] == 3 and figures["max_new_tokens"] == 48
            assert 0 <= figures["avg_at_k"] <= figures["pass_at_k"] + 1e-12 <= 1 + 1e-12
            assert 0 <= figures["truncated"] <= 1 and len(figures["per_question"]["avg_at_k"]) == figures["questions"]
    assert summary["eval_after"]["accuracy"] == summary["eval_after"]["sets"]["heldout"]["accuracy"]
    assert summary["eval_sets"]["math500"] == {"questions": 3, "checker": "boxed", "max_new_tokens": 48}
    assert summary["data"]["chat_template_kwargs"] == {"a": 1}
    rows = history(run)
    for step in (0, 2):
        assert {f"eval/{name}/avg_at_k" for name in BENCHMARKS} <= set(rows[step]), step
    assert "evaluation sets: heldout (4 questions" in out.stdout


def test_kltd_eval_writes_a_results_directory_that_compare_reads_beside_runs(tmp_path):
    run = tmp_path / "run"
    trained = kltd("train", "trainer.max_steps=2", *SMALL, f"hydra.run.dir={run}", f"cache.dir={tmp_path / 'c'}",
                   cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = {}
    for target in ("teacher", str(run)):
        where = tmp_path / f"eval-{len(results)}"
        out = kltd("eval", f"target={target}", ALL_SETS, *LOCAL_SETS, *SMALL, f"hydra.run.dir={where}",
                   f"cache.dir={tmp_path / 'c'}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        results[target] = json.loads((where / "metrics.json").read_text())
        assert "95% interval" in out.stdout
    teacher, student = results["teacher"], results[str(run)]
    assert teacher["kind"] == "eval" and teacher["method"] == "teacher (toy/teacher)"
    assert {"data", "loading", "evaluation"} <= set(teacher["memory"]["peak_mb"])  # peak memory by phase
    assert "reverse_kl_student_states" not in teacher["eval_after"]  # no KL of the teacher against itself
    assert student["method"] == "SFT (run)" and student["evaluated"] == str(run / "checkpoint")
    # the run's trained student, evaluated again on the same held-out questions with the same seed: same figures
    after = json.loads((run / "metrics.json").read_text())["eval_after"]
    assert student["eval_after"]["sets"]["heldout"]["accuracy"] == after["accuracy"]
    assert list(student["eval_after"]["sets"]) == ["heldout", *BENCHMARKS]

    # compare: the teacher is a row beside the run, outside the matrix; paired differences question by question
    report = tmp_path / "report"
    out = kltd("compare", str(run), str(tmp_path / "eval-0"), "--metric", "avg_at_k,gsm8k/avg_at_k", "--against",
               "teacher (toy/teacher)", "--out", str(report), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {row["method"]: row for row in csv_rows(report / "results.csv")}
    assert set(rows) == {"SFT", "teacher (toy/teacher)"} and rows["teacher (toy/teacher)"]["prefix"] == ""
    mine = json.loads((run / "metrics.json").read_text())["eval_after"]["sets"]["heldout"]["per_question"]["avg_at_k"]
    theirs = teacher["eval_after"]["sets"]["heldout"]["per_question"]["avg_at_k"]
    expected = sum(a - b for a, b in zip(mine, theirs)) / len(mine)
    markdown = (report / "results.md").read_text()
    assert "Paired differences against teacher (toy/teacher)" in markdown
    assert f"| SFT | {expected:+.3g}" in markdown


def test_kltd_eval_sweeps_over_targets(tmp_path):
    sweep = tmp_path / "sweep"
    out = kltd("eval", "-m", "target=student,teacher", *SMALL, f"hydra.sweep.dir={sweep}",
               f"cache.dir={tmp_path / 'c'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    methods = sorted(json.loads(p.read_text())["method"] for p in sweep.glob("*/metrics.json"))
    assert methods == ["student (toy/student)", "teacher (toy/teacher)"]


def test_a_hub_set_missing_offline_a_typo_and_a_missing_target_are_one_line_before_anything_runs(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for command, expected in ((["eval", "eval.sets=[heldout,math500]"], "evaluation set math500: hub dataset "
                                                                         "'HuggingFaceH4/MATH-500' cannot be loaded"),
                              (["train", "eval.sets=[gsm8k]"], "evaluation set gsm8k"),
                              (["eval", "eval.samplez=3"], "eval.samplez"),
                              (["eval", f"target={tmp_path / 'nowhere'}"], "nowhere")):
        out = kltd(*command, cwd=tmp_path, env=offline, timeout=300)
        assert out.returncode == 2, (command, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kltd: error:") and expected in lines[0], (command, lines)
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a directory
