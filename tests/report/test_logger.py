"""Local metrics files, and W&B offline runs read back from disk (no network)."""

import json

import pytest

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


BAD_KEY_PROBE = """
import sys
from pathlib import Path
import wandb
import kltd.report.logger as logger_module
from kltd.report.logger import RunLogger
root, reachable = Path(sys.argv[1]), sys.argv[2] == "reachable"
if reachable:  # the server answers, but the start fails (a bad key, a server error)
    logger_module.wandb_unreachable = lambda timeout_s=3.0: None
plain_init = wandb.init
def init(*args, **kwargs):  # each start W&B is asked for, by mode
    print("init", kwargs.get("mode"))
    return plain_init(*args, **kwargs)
wandb.init = init
for job in range(2):  # two jobs of a one-process sweep
    logger = RunLogger(root / f"job{job}", wandb_mode="online", init_timeout_s=5, echo=print)
    logger.log({"train/loss": 1.0}, step=1)
    logger.finish()
"""


@pytest.mark.parametrize("server", ["unreachable", "reachable"])
def test_a_failed_online_start_falls_back_per_job_and_leaves_nothing_in_the_temp_dir(tmp_path, server):
    """Online asked, a key given, but no server (a closed port) or a server that refuses the start: offline with
    one line per job, both runs' metrics on disk, no W&B file left in the system temp directory. Each job finds
    out for itself: with no server it does not try (the connection is refused at once); with one, each tries."""
    import os
    import subprocess
    import sys

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY="0" * 40, TMPDIR=str(temp), HOME=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, "-c", BAD_KEY_PROBE, str(tmp_path), server], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    notes = [line for line in out.stdout.splitlines() if line.startswith("W&B:")]
    why = "127.0.0.1:9 cannot be reached" if server == "unreachable" else "online start failed"
    assert len(notes) == 2 and all(why in line for line in notes), out.stdout
    # counted, not timed
    starts = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("init ")]
    assert starts == (["offline", "offline"] if server == "unreachable" else ["online", "offline"] * 2), out.stdout
    for job in ("job0", "job1"):
        assert json.loads((tmp_path / job / "metrics.jsonl").read_text().splitlines()[0])["train/loss"] == 1.0
        assert list((tmp_path / job / "wandb").glob("offline-run-*"))
    assert list(temp.iterdir()) == []


def test_the_wandb_server_probe_names_the_host_and_port(monkeypatch):
    from kltd.report.logger import wandb_unreachable

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert wandb_unreachable(timeout_s=1.0) == "127.0.0.1:9 cannot be reached"


def test_a_resumed_run_keeps_its_lines_up_to_the_checkpoint_and_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = RunLogger(tmp_path, wandb_mode="offline", echo=lambda line: None)
    for step in (1, 2, 3):
        logger.log({"train/loss": float(step)}, step=step)
    logger.finish()
    run_id = (tmp_path / ".wandb_run_id").read_text()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "train/lo')  # a line torn by the kill
    resumed = RunLogger(tmp_path, wandb_mode="offline", echo=lambda line: None, resume_step=2)
    resumed.log({"train/loss": 30.0}, step=3)
    resumed.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert (tmp_path / ".wandb_run_id").read_text() == run_id
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run_id in p.name for p in runs)  # both sessions log to the one W&B run
