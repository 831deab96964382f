"""Hydra callback (an edge module): when a multirun ends, compare its runs and log the comparison.

Enabled in conf/config.yaml under hydra.callbacks; it prints the matrix, writes results.md, the CSV
and the plots into the sweep directory, and logs one 'compare' run to W&B in the sweep's group.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


# The runs of the last sweep that did not complete (read by kltd.app.train_command for its exit code): found
# from the run directories, so that it holds whatever launcher ran the jobs (in this process or others).
UNFINISHED: list[str] = []


class CompareOnSweepEnd(Callback):
    def __init__(self, metrics: list[str] | None = None):
        self.metrics = list(metrics or [])  # empty: kltd compare's defaults

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from kltd.report.records import CompareError
        from kltd.report.compare import compare, print_result
        from kltd.report.wandb_compare import log_comparison

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            result = compare([sweep_dir], sweep_dir, self.metrics)
        except CompareError as error:
            print(f"kltd: comparison skipped: {error}", file=sys.stderr)
            return
        print_result(result)
        UNFINISHED[:] = [str(run.run_dir) for run in result.runs if run.status != "completed"]
        wandb = config.get("wandb", {})
        log_comparison(result, sweep=sweep_dir.name, project=wandb.get("project", "kltd"),
                       entity=wandb.get("entity"), mode=wandb.get("mode", "auto"))
