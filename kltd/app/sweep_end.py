"""Hydra callback (an edge module): when a multirun ends, compare its runs and log the comparison.

Enabled in conf/config.yaml under hydra.callbacks; it prints the matrix, writes results.md, the CSV
and the plots into the sweep directory, and logs one 'compare' run to W&B in the sweep's group (not when
the sweep was stopped by a signal: its rerun compares).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class CompareOnSweepEnd(Callback):
    def __init__(self, metrics: list[str] | None = None):
        self.metrics = list(metrics or [])  # empty: kltd compare's defaults

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from kltd.report.records import CompareError
        from kltd.report.compare import compare, print_result
        from kltd.report.wandb_compare import log_comparison
        from kltd.train.interrupt import stop_asked

        sweep_dir = Path(config.hydra.sweep.dir)
        if stop_asked() is not None:  # stopped by SIGTERM / Ctrl-C: the command says so in one line; the
            return  # comparison comes when the rerun finishes the sweep
        try:
            result = compare([sweep_dir], sweep_dir, self.metrics)
        except CompareError as error:
            print(f"kltd: comparison skipped: {error}", file=sys.stderr)
            return
        print_result(result)
        wandb = config.get("wandb", {})
        log_comparison(result, sweep=sweep_dir.name, project=wandb.get("project", "kltd"),
                       entity=wandb.get("entity"), mode=wandb.get("mode", "auto"))
