"""`kltd compare --at`: every run's evaluation curve read at one cost budget, the matrix there, the Pareto plot.

Run directories are written by hand in the format training leaves: metrics.jsonl rows with `step`, evaluations
as `eval/<metric>` and cumulative costs as `cost/flops`, `cost/tokens_processed`, `cost/wall_time_s` (in the
evaluation's row or in another row of the same step).
"""

import csv
import json
import statistics
from pathlib import Path

import pytest

from kltd.app.cli import main as kltd_main
from kltd.report.budget import budget_text, default_budget, interpolate, number_text, pareto_front
from kltd.report.compare import compare
from kltd.report.records import CompareError
from kltd.report.tables import matrix_table
from tests.report.test_compare import PNG_MAGIC, write_run


def write_costed_run(run_dir: Path, method, prefix, trajectory, seed, points, *, split_rows=False,
                     cost_at_step_0=True, costs=True, extra=None):
    """A finished run whose evaluations are `points`: (step, flops, accuracy), step 0 first."""
    write_run(run_dir, method, prefix, trajectory, seed, points[-1][2])
    rows = []
    for step, flops, accuracy in points:
        evaluation = {"step": step, "eval/accuracy": accuracy, "eval/reverse_kl_student_states": 2.0 - accuracy,
                      **(extra(step) if extra else {})}
        cost = {"cost/flops": flops, "cost/tokens_processed": flops / 1e3, "cost/wall_time_s": flops / 1e10}
        if not costs or (step == 0 and not cost_at_step_0):
            cost = {}
        if step:
            rows.append({"step": step, "train/loss": 1.0 / step, **({} if split_rows else cost)})
            rows += [{"step": step, **cost}] if split_rows and cost else []
            rows.append(evaluation)
        else:
            rows.append({**evaluation, **cost})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


# OPD reaches 1e12 FLOPs, DAgger 8e11 (its seeds), SFT 1.5e12: every cell reached 8e11
OPD = [(0, 0, 0.1), (10, 4e11, 0.3), (20, 1e12, 0.5)]
DAGGER = {0: [(0, 0, 0.1), (10, 4e11, 0.2), (20, 8e11, 0.6)], 1: [(0, 0, 0.1), (10, 5e11, 0.4), (20, 9e11, 0.7)]}
SFT = [(0, 0, 0.1), (10, 7.5e11, 0.25), (20, 1.5e12, 0.35)]


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    write_costed_run(root / "0_opd_s0", "OPD", "student", "student", 0, OPD)
    for seed, points in DAGGER.items():  # one seed with eval and cost rows apart, step 0 without a cost
        write_costed_run(root / f"{seed + 1}_dagger_s{seed}", "DAgger", "student", "expert", seed, points,
                         split_rows=seed == 1, cost_at_step_0=seed == 0)
    write_costed_run(root / "3_sft_s0", "SFT", "fixed", "expert", 0, SFT)
    return root


def cell(result, metric, prefix, trajectory):
    table = result.budget.table(metric)
    return dict(zip(table.headers[1:], next(line for line in table.rows if line[0] == prefix)[1:]))[trajectory]


def row_by_label(result, label):
    return next(row for row in result.rows if row.label == label)


def test_the_value_at_a_budget_is_linear_between_the_two_evaluations_around_it(sweep, tmp_path):
    # OPD at 7e11: between (4e11, 0.3) and (1e12, 0.5): 0.3 + (0.5 - 0.3) * (7e11 - 4e11) / (1e12 - 4e11) = 0.4
    assert interpolate([(0, 0.1), (4e11, 0.3), (1e12, 0.5)], 7e11) == pytest.approx(0.4)
    assert interpolate([(0, 0.1), (4e11, 0.3), (1e12, 0.5)], 4e11) == 0.3  # an evaluation at the budget: itself
    assert interpolate([(0, 0.1), (4e11, 0.3), (1e12, 0.5)], 1e12) == 0.5
    assert interpolate([(0, 0.1), (4e11, 0.3), (1e12, 0.5)], 1.1e12) is None  # never extrapolated
    assert interpolate([(1e11, 0.1), (4e11, 0.3)], 5e10) is None
    result = compare([sweep], tmp_path / "report", ["accuracy"], at="flops", budget=7e11)
    assert result.budget.stat(row_by_label(result, "OPD"), "accuracy").mean == pytest.approx(0.4)
    assert cell(result, "accuracy", "student", "student") == "OPD\n0.400"
    # DAgger seed 0: 0.2 + 0.4 * 3e11 / 4e11 = 0.5; seed 1 (eval and cost in separate rows): 0.4 + 0.3 * 2e11 / 4e11
    dagger = [0.2 + 0.4 * 3 / 4, 0.4 + 0.3 * 2 / 4]
    stat = result.budget.stat(row_by_label(result, "DAgger"), "accuracy")
    assert stat.values == pytest.approx(dagger)
    assert stat.std == pytest.approx(statistics.stdev(dagger))
    assert cell(result, "accuracy", "student", "expert") == f"DAgger\n{statistics.mean(dagger):.3f} ± " \
                                                           f"{statistics.stdev(dagger):.3f} (n=2)"
    # a lower-is-better metric is read the same way: 2 - 0.4
    assert result.budget.stat(row_by_label(result, "OPD"), "reverse_kl_student_states").mean == pytest.approx(1.6)


def test_the_default_budget_is_the_largest_every_run_reached(sweep, tmp_path):
    result = compare([sweep], tmp_path / "report", ["accuracy"], at="flops")
    assert result.budget.budget == 8e11 == min(max(f for _, f, _ in p) for p in [OPD, SFT, *DAGGER.values()])
    assert default_budget(result.runs, "flops") == 8e11
    assert not result.budget.given
    assert result.budget.table("accuracy").title.startswith(
        "accuracy at 8e11 FLOPs (the largest budget every cell reached")
    # the run that sets the budget is read at its last evaluation, the others in between
    assert result.budget.stat(row_by_label(result, "DAgger"), "accuracy").values == pytest.approx(
        [0.6, 0.4 + 0.3 * 3 / 4])
    assert result.budget.stat(row_by_label(result, "SFT"), "accuracy").mean == pytest.approx(0.25 + 0.1 * 0.5 / 7.5)
    # the other cost axes read their own keys
    tokens = compare([sweep], tmp_path / "tokens", ["accuracy"], at="tokens")
    assert tokens.budget.budget == pytest.approx(8e8) and tokens.budget.text == "8e8 tokens"
    time = compare([sweep], tmp_path / "time", ["accuracy"], at="time")
    assert time.budget.budget == pytest.approx(80) and time.budget.text == "80 s"


def test_a_cell_that_does_not_reach_the_budget_is_marked_not_extrapolated(sweep, tmp_path):
    result = compare([sweep], tmp_path / "report", ["accuracy"], at="flops", budget=1.2e12)
    assert result.budget.given and "given by --budget" in result.budget.title("accuracy")
    assert cell(result, "accuracy", "student", "student") == "OPD\ndoes not reach 1.2e12 FLOPs (last evaluation at 1e12)"
    assert cell(result, "accuracy", "student", "expert").startswith("DAgger\ndoes not reach 1.2e12 FLOPs")
    assert cell(result, "accuracy", "fixed", "expert") == f"SFT\n{0.25 + 0.1 * 4.5 / 7.5:.3f}"
    # one seed short of the budget: the other seed's value, and the count that did not reach
    part = compare([sweep], tmp_path / "part", ["accuracy"], at="flops", budget=8.6e11)
    assert cell(part, "accuracy", "student", "expert") == "DAgger\n0.670 (1 does not reach)"  # 0.4 + 0.3 * 3.6 / 4
    with (tmp_path / "report" / "results.csv").open() as f:
        rows = {row["run_dir"]: row for row in csv.DictReader(f)}
    assert rows[str(sweep / "0_opd_s0")]["accuracy_at_budget"] == ""  # no number, not an extrapolated one
    assert float(rows[str(sweep / "3_sft_s0")]["accuracy_at_budget"]) == pytest.approx(0.25 + 0.1 * 4.5 / 7.5)
    assert float(rows[str(sweep / "3_sft_s0")]["budget_flops"]) == 1.2e12


def test_runs_without_cost_records_are_marked_and_none_at_all_is_an_error(sweep, tmp_path):
    write_costed_run(sweep / "4_seqkd_s0", "SeqKD", "teacher", "expert", 0, OPD, costs=False)
    result = compare([sweep], tmp_path / "report", ["accuracy"], at="flops")
    assert cell(result, "accuracy", "teacher", "expert") == "SeqKD\nno cost records"
    assert result.budget.budget == 8e11  # the run without costs does not hold the budget down
    old = tmp_path / "old"
    write_costed_run(old / "0_opd_s0", "OPD", "student", "student", 0, OPD, costs=False)
    with pytest.raises(CompareError, match="no finished run has cost/flops in metrics.jsonl"):
        compare([old], tmp_path / "report", ["accuracy"], at="flops")


def test_a_budget_no_cell_reaches_and_a_budget_without_at_are_errors(sweep, tmp_path):
    with pytest.raises(CompareError, match="no run reaches 1e20 FLOPs; the furthest reached 1.5e12 FLOPs"):
        compare([sweep], tmp_path / "report", ["accuracy"], at="flops", budget=1e20)
    with pytest.raises(CompareError, match="--budget needs --at"):
        compare([sweep], tmp_path / "report", ["accuracy"], budget=1e12)


def test_the_pareto_frontier_of_hand_made_points():
    points = {"cheap": (0.5, 0.2), "a": (1.0, 0.5), "b": (2.0, 0.7), "c": (3.0, 0.6), "d": (2.0, 0.4),
              "tie": (2.0, 0.7)}
    # c: b costs less and is better; d: a costs less and is better; b and its exact twin both stay
    assert pareto_front(points, "higher") == ["cheap", "a", "b", "tie"]
    assert pareto_front({k: v for k, v in points.items() if k != "tie"}, "higher") == ["cheap", "a", "b"]
    # lower is better (a divergence): the cheapest is also the best, so it alone is on the frontier
    assert pareto_front({"cheap": (0.5, 0.2), "a": (1.0, 0.5), "c": (3.0, 0.1)}, "lower") == ["cheap", "c"]
    assert pareto_front({"x": (1.0, 0.3)}, "higher") == ["x"]


def test_the_pareto_plot_and_the_matrix_at_the_budget_are_written_beside_the_usual_report(sweep, tmp_path):
    out = tmp_path / "report"
    result = compare([sweep], out, ["accuracy", "reverse_kl_student_states"], at="flops")
    names = {path.name for path in result.files}
    for name in ("pareto_accuracy_flops.png", "pareto_reverse_kl_student_states_flops.png",
                 "matrix_accuracy_at_flops.png", "matrix_accuracy.png", "learning_curves.png"):
        assert name in names, names
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    final = result.budget.final_points("accuracy")
    assert final["OPD"] == (1e12, 0.5) and final["DAgger"] == pytest.approx((8.5e11, 0.65))
    assert pareto_front(final, "higher") == ["DAgger"]  # cheaper and better than both others
    markdown = (out / "results.md").read_text()
    assert "### Method matrix: accuracy after training" in markdown  # the equal-steps tables stay
    assert "## At equal flops: 8e11 FLOPs" in markdown and "linear interpolation" in markdown
    assert "### accuracy at 8e11 FLOPs (the largest budget every cell reached" in markdown
    assert "(pareto_accuracy_flops.png)" in markdown
    with (out / "results.csv").open() as f:
        header = next(csv.reader(f))
    assert header[-3:] == ["budget_flops", "accuracy_at_budget", "reverse_kl_student_states_at_budget"]


def test_a_per_set_metric_is_read_like_a_plain_one(sweep, tmp_path):
    root = tmp_path / "sets"
    write_costed_run(root / "0_opd_s0", "OPD", "student", "student", 0, OPD,
                     extra=lambda step: {"eval/gsm8k/pass_at_k": step / 40})
    result = compare([root], tmp_path / "report", ["gsm8k/pass_at_k"], at="flops", budget=7e11)
    assert result.budget.stat(result.rows[0], "gsm8k/pass_at_k").mean == pytest.approx(0.25 + 0.25 * 3 / 6)
    assert (tmp_path / "report" / "pareto_gsm8k_pass_at_k_flops.png").is_file()
    assert number_text(1.2e12) == "1.2e12" and budget_text("time", 3456.0) == "3460 s"


def test_without_at_the_matrix_is_the_one_after_training(sweep, tmp_path):
    result = compare([sweep], tmp_path / "report", ["accuracy"])
    assert result.budget is None
    assert matrix_table(result.rows, "accuracy").title == "Method matrix: accuracy after training (mean ± std across seeds)"
    assert not list((tmp_path / "report").glob("pareto_*"))


def kltd(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        kltd_main(["compare", *args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


def test_cli_at_flops_prints_the_matrix_at_one_budget_and_writes_the_pareto_plot(sweep, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = kltd(capsys, str(sweep), "--at", "flops", "--metric", "accuracy")
    assert code == 0, err
    assert "accuracy at 8e11 FLOPs (the largest budget every cell reached" in out
    assert "Method matrix: accuracy after training" in out  # the equal-steps matrix is still printed
    assert "linear interpolation" in out
    assert (sweep / "pareto_accuracy_flops.png").is_file()
    code, out, err = kltd(capsys, str(sweep), "--at", "flops", "--budget", "1.2e12", "--metric", "accuracy",
                          "--out", str(tmp_path / "given"))
    assert code == 0, err
    assert "accuracy at 1.2e12 FLOPs (given by --budget" in out and "does not reach 1.2e12 FLOPs" in out


@pytest.mark.parametrize("args", [["--budget", "1e12", "SWEEP"], ["--at", "steps", "SWEEP"],
                                  ["--at", "flops", "--budget", "1e20", "SWEEP"],
                                  ["--at", "flops", "--budget", "lots", "SWEEP"],
                                  ["--at", "flops", "--budget", "-5", "SWEEP"], ["--at", "flops", "OLD"]])
def test_cli_errors_are_one_line_exit_2(sweep, tmp_path, capsys, args):
    write_costed_run(tmp_path / "old" / "0_opd_s0", "OPD", "student", "student", 0, OPD, costs=False)
    args = [{"SWEEP": str(sweep), "OLD": str(tmp_path / "old")}.get(a, a) for a in args]
    code, out, err = kltd(capsys, *args, "--out", str(tmp_path / "report"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kltd: error: "), err
    assert "Traceback" not in err + out


def test_cli_help_shows_an_at_flops_example(capsys):
    code, out, _ = kltd(capsys, "--help")
    assert code == 0 and "--at flops" in out and "--budget" in out
