"""Local metrics files, and W&B offline runs read back from disk (no network)."""

import json


from kltd.report.logger import RunLogger, resolve_wandb_mode
from tests.support.wandb_records import read_run


def test_auto_mode_without_credentials_is_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode("auto") == ("offline", "no credentials found")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == ("online", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto")[0] == "disabled"


def test_disabled_still_writes_local_metrics(tmp_path):
    logger = RunLogger(tmp_path, wandb_mode="disabled")
    logger.log({"train/loss": 1.0, "bad": float("nan")}, step=1)
    logger.finish()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 1.0, "bad": None}]


def test_offline_run_says_so_in_one_line_and_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    said = []
    logger = RunLogger(tmp_path, wandb_mode="offline", name="opd-s0", group="sweep-1", job_type="opd",
                       tags=["prefix:student", "trajectory:student"], config={"method": "OPD", "axis_prefix": "student"},
                       echo=said.append)
    logger.log({"train/loss": 2.5}, step=1)
    logger.log({"train/loss": 1.5, "eval/accuracy": 0.75}, step=2)
    logger.finish()
    assert len(said) == 1 and "offline" in said[0] and "wandb sync" in said[0]
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run = read_run(files[0])
    assert run["run"]["group"] == "sweep-1" and run["run"]["name"] == "opd-s0" and run["run"]["job_type"] == "opd"
    assert set(run["run"]["tags"]) == {"prefix:student", "trajectory:student"}
    assert run["config"]["method"] == "OPD" and run["config"]["axis_prefix"] == "student"
    losses = [h["train/loss"] for h in run["history"] if "train/loss" in h]
    assert losses == [2.5, 1.5]
    assert [h["eval/accuracy"] for h in run["history"] if "eval/accuracy" in h] == [0.75]
