"""At the end of a sweep: one W&B run in the sweep's group with the comparison as a Table and the plots
as images, so the W&B project shows the same matrix as `kltd compare`."""

from __future__ import annotations

from kltd.report.logger import start_wandb


def log_comparison(result, *, sweep: str, project: str = "kltd", entity=None, mode: str = "auto", echo=print) -> str:
    """Upload `result` (a kltd.report.compare.CompareResult) as a 'compare' job; returns the mode used."""
    init = dict(project=project, entity=entity, group=sweep, job_type="compare", name=f"compare-{sweep}",
                dir=str(result.out_dir), reinit="finish_previous")
    run, mode = start_wandb(mode, init, where=result.out_dir, echo=echo)
    if run is None:
        return mode
    import wandb

    columns, rows = comparison_rows(result)
    run.log({"comparison/matrix": wandb.Table(columns=columns, data=rows)})
    for path in result.files:
        if str(path).endswith(".png"):
            run.log({f"comparison/{path.stem}": wandb.Image(str(path))})
    run.finish()
    return mode


def comparison_rows(result) -> tuple[list[str], list[list]]:
    """One row per method: identity, seeds, and mean/std of each compared metric and of the costs."""
    columns = ["method", "prefix", "trajectory", "seeds"]
    for metric in result.metrics:
        columns += [f"{metric}_mean", f"{metric}_std"]
    columns += ["wall_time_s_mean", "tokens_generated_mean"]
    rows = []
    for summary in result.rows:
        row = [summary.label, summary.prefix, summary.trajectory, len(summary.completed)]
        for metric in result.metrics:
            stat = summary.after(metric)
            row += [stat.mean if stat else None, stat.std if stat else None]
        for cost in ("wall_time_s", "tokens_generated"):
            stat = summary.cost(cost)
            row.append(stat.mean if stat else None)
        rows.append(row)
    return columns, rows
