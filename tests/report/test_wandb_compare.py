"""The end-of-sweep comparison run, logged offline and read back from disk."""

import json

from kltd.report.compare import compare
from kltd.report.wandb_compare import comparison_rows, log_comparison
from tests.support.wandb_records import read_run


def write_run(root, name, method, prefix, trajectory, seed, accuracy):
    run = root / name
    run.mkdir(parents=True)
    summary = {"method": method, "prefix": prefix, "trajectory": trajectory, "seed": seed, "status": "completed",
               "steps": 2, "wall_time_s": 1.0, "tokens": {"student_generated": 5, "teacher_generated": 0, "scored": 4,
                                                          "trained": 2},
               "eval_before": {"accuracy": 0.1}, "eval_after": {"accuracy": accuracy},
               "config": {"seed": seed, "prefix": {"source": prefix}, "trajectory": {"supervisor": trajectory}}}
    (run / "metrics.json").write_text(json.dumps(summary))


def test_comparison_run_holds_the_matrix_table(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sweep = tmp_path / "sweep-7"
    write_run(sweep, "0_sft_s0", "SFT", "fixed", "expert", 0, 0.5)
    write_run(sweep, "1_sft_s1", "SFT", "fixed", "expert", 1, 0.7)
    write_run(sweep, "2_opd_s0", "OPD", "student", "student", 0, 0.9)
    result = compare([sweep], sweep, ["accuracy"])
    columns, rows = comparison_rows(result)
    by_method = {r[0]: dict(zip(columns, r)) for r in rows}
    assert abs(by_method["SFT"]["accuracy_mean"] - 0.6) < 1e-9 and by_method["SFT"]["seeds"] == 2
    said = []
    assert log_comparison(result, sweep="sweep-7", mode="offline", echo=said.append) == "offline"
    assert len(said) == 1
    files = list((sweep / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run = read_run(files[0])
    assert run["run"]["group"] == "sweep-7" and run["run"]["job_type"] == "compare"
    logged = {key: value for row in run["history"] for key, value in row.items()}
    assert logged["comparison/matrix/_type"] == "table-file"
    assert logged["comparison/matrix_accuracy/_type"] == "image-file"
    # the table's own file holds the same numbers
    table = json.loads(next(files[0].parent.glob("files/media/table/comparison/matrix_*.table.json")).read_text())
    rows = {r[0]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert abs(rows["SFT"]["accuracy_mean"] - 0.6) < 1e-9 and rows["OPD"]["accuracy_mean"] == 0.9
