"""`kltd compare` on synthetic run directories: the numbers, the matrix, the files, the command line."""

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kltd.report.records import CompareError
from kltd.report.compare import compare
from kltd.report.tables import matrix_cells, matrix_table, to_markdown

KLTD = [sys.executable, "-m", "kltd.app.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP = "2026-11-28_09-00-00"
DAGGER_ACCURACY = [0.4, 0.5, 0.7]  # seeds 0, 1, 2
DAGGER_RKL = [3.0, 2.5, 2.0]
DAGGER_WALL = [40.0, 42.0, 47.0]


def eval_block(accuracy, rkl=2.0, with_curves=True, with_pass_at_k=True):
    block = {"accuracy": accuracy, "response_length": 12.0, "reverse_kl_student_states": rkl,
             "forward_kl_teacher_states": 2.9, "student_entropy": 0.3, "student_tokens_generated": 10,
             "teacher_tokens_generated": 20}
    if with_pass_at_k:
        block["pass_at_k"] = min(1.0, accuracy + 0.2)
    if with_curves:
        block["divergence_by_position"] = {"student_states": [0.1 * rkl, 0.2 * rkl, 0.4 * rkl],
                                           "teacher_states": [0.1, 0.15, 0.2]}
    return block


def write_run(run_dir: Path, method, prefix, trajectory, seed, accuracy, *, rkl=2.0, wall=40.0, lr=1e-3,
              status="completed", error=None, old_format=False, config=None):
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    config = config or {"seed": seed, "prefix": {"source": prefix}, "trajectory": {"supervisor": trajectory},
                        "trainer": {"lr": lr, "max_steps": 20}, "wandb": {"mode": "disabled"}}
    summary = {"method": method, "method_slug": method.lower(), "prefix": prefix, "trajectory": trajectory,
               "seed": seed, "sweep": SWEEP, "status": status, "wall_time_s": wall, "config": config}
    if status == "failed":
        summary["error"] = error
    else:
        summary.update({"train_time_s": wall - 10, "steps": 20, "steps_per_s": 2.0, "final_loss": 0.1,
                        "tokens": {"student_generated": 100 * (seed + 1), "teacher_generated": 50, "scored": 300,
                                   "trained": 400},
                        "eval_before": eval_block(0.1, with_curves=not old_format, with_pass_at_k=not old_format),
                        "eval_after": eval_block(accuracy, rkl, with_curves=not old_format,
                                                 with_pass_at_k=not old_format)})
    (run_dir / "metrics.json").write_text(json.dumps(summary))
    # a failed run logged a few steps before it stopped
    train_steps, eval_steps = ((5, 10), (0,)) if status == "failed" else ((5, 10, 15, 20), (0, 10, 20))
    history = [{"step": step, "train/loss": 1.0 / step, "cost/wall_time_s": step * 0.5} for step in train_steps]
    history += [{"step": step, "eval/accuracy": 0.1 + ((accuracy or 0) - 0.1) * step / 20,
                 "eval/reverse_kl_student_states": None} for step in eval_steps]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in history) + "\n")


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A Hydra-like sweep: DAgger x 3 seeds, SFT, OPD (old format), a failed GKD, a missing teacher-prefix cell."""
    root = tmp_path / "outputs" / "multirun" / SWEEP
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for seed, (acc, rkl, wall) in enumerate(zip(DAGGER_ACCURACY, DAGGER_RKL, DAGGER_WALL)):
        write_run(root / f"{seed + 1}_dagger_s{seed}", "DAgger", "student", "expert", seed, acc, rkl=rkl, wall=wall)
    write_run(root / "0_sft_s0", "SFT", "fixed", "expert", 0, 0.3)
    write_run(root / "4_opd_s0", "OPD", "student", "student", 0, 0.6, old_format=True)
    write_run(root / "5_gkd_s0", "GKD", "mixed", "expert", 0, None, status="failed",
              error="RuntimeError: CUDA out of memory [rank 0]")
    missing = root / "6_teacher-prefix-rkl_s0"
    (missing / ".hydra").mkdir(parents=True)
    (missing / ".hydra" / "config.yaml").write_text(
        "seed: 0\nprefix:\n  source: teacher\ntrajectory:\n  supervisor: student\ntrainer:\n  lr: 0.001\n")
    return root


def row_by_label(result, label):
    return next(row for row in result.rows if row.label == label)


def test_mean_and_std_across_seeds(sweep, tmp_path):
    result = compare([sweep], tmp_path / "report", ["accuracy"])
    dagger = row_by_label(result, "DAgger")
    assert [run.seed for run in dagger.runs] == [0, 1, 2]
    accuracy = dagger.after("accuracy")
    assert accuracy.n == 3
    assert accuracy.mean == pytest.approx(statistics.mean(DAGGER_ACCURACY))
    assert accuracy.std == pytest.approx(statistics.stdev(DAGGER_ACCURACY))
    assert dagger.after("reverse_kl_student_states").std == pytest.approx(statistics.stdev(DAGGER_RKL))
    assert dagger.cost("wall_time_s").mean == pytest.approx(statistics.mean(DAGGER_WALL))
    # tokens generated = student + teacher, per seed: 150, 250, 350
    assert dagger.cost("tokens_generated").mean == pytest.approx(250)
    expected = f"{statistics.mean(DAGGER_ACCURACY):.3f} ± {statistics.stdev(DAGGER_ACCURACY):.3f} (n=3)"
    assert dagger.value_text("accuracy") == expected
    assert row_by_label(result, "SFT").value_text("accuracy") == "0.300"  # one seed: just the value


def test_matrix_places_methods_in_their_cells(sweep, tmp_path):
    result = compare([sweep], tmp_path / "report", ["accuracy"])
    cells = {cell: [row.label for row in rows] for cell, rows in matrix_cells(result.rows).items()}
    assert cells == {("fixed", "expert"): ["SFT"], ("teacher", "student"): ["Teacher-prefix RKL"],
                     ("student", "expert"): ["DAgger"], ("student", "student"): ["OPD"], ("mixed", "expert"): ["GKD"]}
    table = matrix_table(result.rows, "accuracy")
    assert table.headers == ["prefix \\ trajectory", "expert", "student"]  # no dataset column: no run there
    assert [line[0] for line in table.rows] == ["fixed", "teacher", "student", "mixed"]
    by_prefix = {line[0]: dict(zip(table.headers[1:], line[1:])) for line in table.rows}
    assert by_prefix["student"]["expert"].startswith("DAgger\n0.533 ± 0.153 (n=3)")
    assert by_prefix["student"]["student"] == "OPD\n0.600"
    assert by_prefix["fixed"]["student"] == "not run"
    assert by_prefix["teacher"]["expert"] == "not run"


def test_failed_and_missing_cells_are_shown(sweep, tmp_path):
    result = compare([sweep], tmp_path / "report", ["accuracy"])
    by_prefix = {line[0]: line for line in matrix_table(result.rows, "accuracy").rows}
    assert by_prefix["mixed"][1] == "GKD\nfailed: RuntimeError: CUDA out of memory [rank 0]"
    assert by_prefix["teacher"][2] == "Teacher-prefix RKL\nmissing"
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "failed: RuntimeError: CUDA out of memory [rank 0]" in markdown
    assert "Teacher-prefix RKL<br>missing" in markdown


def test_csv_has_one_row_per_run(sweep, tmp_path):
    compare([sweep], tmp_path / "report", ["accuracy"])
    with (tmp_path / "report" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    assert {row["status"] for row in rows} == {"completed", "failed", "missing"}
    dagger = sorted((row for row in rows if row["method"] == "DAgger"), key=lambda row: row["seed"])
    assert [float(row["accuracy"]) for row in dagger] == DAGGER_ACCURACY
    assert [float(row["wall_time_s"]) for row in dagger] == DAGGER_WALL
    assert [int(row["tokens_generated"]) for row in dagger] == [150, 250, 350]
    assert {row["sweep"] for row in rows} == {SWEEP}
    assert all(float(row["accuracy_before"]) == 0.1 for row in dagger)
    assert all((row["prefix"], row["trajectory"]) == ("student", "expert") for row in dagger)
    opd = next(row for row in rows if row["method"] == "OPD")
    assert opd["pass_at_k"] == ""  # older runs lack it: blank, not a crash
    gkd = next(row for row in rows if row["method"] == "GKD")
    assert gkd["status"] == "failed" and "out of memory" in gkd["error"] and gkd["accuracy"] == ""
    missing = next(row for row in rows if row["status"] == "missing")
    assert (missing["method"], missing["prefix"], missing["trajectory"]) == ("Teacher-prefix RKL", "teacher", "student")


def test_pngs_are_written_and_valid(sweep, tmp_path):
    out = tmp_path / "report"
    result = compare([sweep], out, ["accuracy", "reverse_kl_student_states"])
    names = {path.name for path in result.files}
    expected = {"matrix_accuracy.png", "matrix_reverse_kl_student_states.png", "divergence_by_position.png",
                "learning_curves.png", "results.md", "results.csv"}
    assert names == expected
    for name in expected - {"results.md", "results.csv"}:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    markdown = (out / "results.md").read_text()
    assert "![accuracy matrix](matrix_accuracy.png)" in markdown and "(learning_curves.png)" in markdown


def test_divergence_plot_is_skipped_with_a_note_when_no_run_has_curves(tmp_path):
    write_run(tmp_path / "runs" / "0_sft_s0", "SFT", "fixed", "expert", 0, 0.3, old_format=True)
    result = compare([tmp_path / "runs"], tmp_path / "report", ["accuracy"])
    assert not (tmp_path / "report" / "divergence_by_position.png").exists()
    assert any("divergence_by_position.png skipped" in note for note in result.notes)


def test_different_settings_are_not_averaged_together(tmp_path):
    write_run(tmp_path / "runs" / "0_dagger_s0", "DAgger", "student", "expert", 0, 0.4, lr=1e-3)
    write_run(tmp_path / "runs" / "1_dagger_s0", "DAgger", "student", "expert", 0, 0.8, lr=1e-4)
    result = compare([tmp_path / "runs"], tmp_path / "report", ["accuracy"])
    assert sorted(row.label for row in result.rows) == ["DAgger [trainer.lr=0.0001]", "DAgger [trainer.lr=0.001]"]
    assert all(row.after("accuracy").n == 1 for row in result.rows)


def test_unknown_metric_and_empty_directory_are_user_errors(sweep, tmp_path):
    with pytest.raises(CompareError, match="unknown metric 'acc'"):
        compare([sweep], tmp_path / "report", ["acc"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match="no runs found"):
        compare([tmp_path / "empty"], tmp_path / "report", ["accuracy"])


def test_markdown_escapes_pipes():
    from kltd.report.tables import TableData

    assert "a\\|b<br>c" in to_markdown(TableData("t", ["h"], [["a|b\nc"]]))


# a limit for a hung command only: a busy machine can take minutes to start Python and import the plotting stack
TIMEOUT_S = 600


def run_cli(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([*KLTD, "compare", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=TIMEOUT_S)


def test_cli_prints_the_tables_and_writes_into_the_sweep_dir(sweep, tmp_path):
    out = run_cli(str(sweep), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Method matrix: accuracy" in out.stdout
    assert "0.533 ± 0.153 (n=3)" in out.stdout
    assert "failed: RuntimeError: CUDA out of memory [rank 0]" in out.stdout
    assert "missing" in out.stdout and "Quality next to cost" in out.stdout
    assert "Method matrix: reverse_kl_student_states" in out.stdout  # the defaults: what a sweep's end shows
    assert f"wrote 6 files to {sweep}" in out.stdout  # a sweep dir is the default --out
    assert (sweep / "results.md").is_file() and (sweep / "matrix_accuracy.png").is_file()
    assert (sweep / "matrix_reverse_kl_student_states.png").is_file()


def test_cli_given_a_run_dir_writes_to_the_cwd(sweep, tmp_path):
    out = run_cli(str(sweep / "0_sft_s0"), "--metric", "accuracy,pass_at_k", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Method matrix: pass_at_k" in out.stdout
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "matrix_pass_at_k.png").is_file()


@pytest.mark.parametrize("args", [["does/not/exist"], ["--metric", "nope", "SWEEP"], ["EMPTY"], []])
def test_cli_errors_are_one_line_exit_2(sweep, tmp_path, args):
    (tmp_path / "empty").mkdir()
    args = [{"SWEEP": str(sweep), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in args]
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kltd: error: "), out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_help():
    out = subprocess.run([*KLTD, "compare", "--help"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0 and "--metric" in out.stdout and "--out" in out.stdout


def test_a_method_with_one_failed_seed_keeps_its_number_and_says_so(tmp_path):
    write_run(tmp_path / "runs" / "0_opd_s0", "OPD", "student", "student", 0, 0.5)
    write_run(tmp_path / "runs" / "1_opd_s1", "OPD", "student", "student", 1, 0.7)
    write_run(tmp_path / "runs" / "2_opd_s2", "OPD", "student", "student", 2, None, status="failed", error="boom")
    result = compare([tmp_path / "runs"], tmp_path / "report", ["accuracy"])
    (opd,) = result.rows
    assert opd.value_text("accuracy") == f"0.600 ± {statistics.stdev([0.5, 0.7]):.3f} (n=2, 1 failed)"
    assert opd.seeds_text() == "2 (1 failed)"


def test_a_missing_seed_joins_its_methods_row_by_the_label_its_config_gives(tmp_path):
    import dataclasses

    import yaml

    from kltd.schema.config import Config, config_method_label

    config = Config()
    config.prefix.source, config.prefix.student_fraction, config.trajectory.supervisor = "mixed", 0.9, "expert"
    label = config_method_label(config)  # e.g. "GKD λ=0.9": more than the cell's plain name
    write_run(tmp_path / "runs" / "0_gkd_s0", label, "mixed", "expert", 0, 0.5, config=dataclasses.asdict(config))
    missing = tmp_path / "runs" / "1_gkd_s1" / ".hydra"
    missing.mkdir(parents=True)
    (missing / "config.yaml").write_text(yaml.safe_dump({**dataclasses.asdict(config), "seed": 1}, allow_unicode=True))
    result = compare([tmp_path / "runs"], tmp_path / "report", ["accuracy"])
    (row,) = result.rows
    assert row.label == label and row.seeds_text() == "1 (1 missing)"


def test_only_quality_metrics_have_a_better_direction():
    from kltd.report.aggregate import better_direction

    assert better_direction("accuracy") == "higher" and better_direction("pass_at_k") == "higher"
    assert better_direction("reverse_kl_student_states") == "lower"
    assert better_direction("student_entropy") is None and better_direction("response_length") is None


def test_runs_without_an_answer_checker_are_compared_on_the_metrics_they_have(tmp_path):
    """Data with data.checker=none have no accuracy: the default comparison uses what the runs measured."""
    for i, (method, prefix, trajectory) in enumerate((("SFT", "fixed", "expert"), ("OPD", "student", "student"))):
        run_dir = tmp_path / f"{i}_{method.lower()}_s0"
        write_run(run_dir, method, prefix, trajectory, 0, 0.5)
        summary = json.loads((run_dir / "metrics.json").read_text())
        for phase in ("eval_before", "eval_after"):
            summary[phase].pop("accuracy")
            summary[phase].pop("pass_at_k")
        (run_dir / "metrics.json").write_text(json.dumps(summary))
    result = compare([tmp_path], tmp_path, [])
    assert result.metrics == ["reverse_kl_student_states"]
    assert (tmp_path / "matrix_reverse_kl_student_states.png").is_file()
