"""At the end of a sweep: one W&B run in the sweep's group with the comparison as a Table and the plots
as images, so the W&B project shows the same matrix as `kltd compare`."""

from __future__ import annotations

from kltd.report.logger import OFFLINE_NOTE, resolve_wandb_mode


def log_comparison(result, *, sweep: str, project: str = "kltd", entity=None, mode: str = "auto", echo=print) -> str:
    """Upload `result` (a kltd.report.compare.CompareResult) as a 'compare' job; returns the mode used."""
    mode, why = resolve_wandb_mode(mode)
    if mode == "disabled":
        return mode
    import wandb

    if mode == "offline":
        echo(OFFLINE_NOTE.format(why=why or "offline mode requested", dir=result.out_dir))
    init = dict(project=project, entity=entity, group=sweep, job_type="compare", name=f"compare-{sweep}",
                dir=str(result.out_dir), reinit="finish_previous")
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(silent=mode == "offline"), **init)
    except Exception as error:  # an online start that fails falls back to offline, as training runs do
        echo(OFFLINE_NOTE.format(why=f"online start failed ({type(error).__name__})", dir=result.out_dir))
        mode = "offline"
        run = wandb.init(mode=mode, settings=wandb.Settings(silent=True), **init)
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
