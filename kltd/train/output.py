"""What a job shows and writes: its console lines, its metrics log, the files in its run directory.

Process 0 of a run holds the real `Output`; the other processes of a data-parallel run hold a silent one
(`Output.silent()`), so the stages of a job (kltd.train.stages) report without asking which process they
run in.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kltd.files import DiskFull, atomic_write_dir, atomic_write_json
from kltd.report.logger import QuietLogger
from kltd.train import checkpoint
from kltd.train.sharding import save_weights

HEADLINE = ("accuracy", "avg_at_k", "pass_at_k", "reverse_kl_student_states", "forward_kl_teacher_states",
            "student_entropy", "response_length", "truncated", "exact_reverse_kl", "exact_forward_kl", "exact_accepted")
SET_HEADLINE = ("accuracy", "avg_at_k", "pass_at_k", "response_length", "truncated")  # a table of several sets


def plain_lines(console: Console):
    """Print a message as one unwrapped, unstyled line (paths and warnings stay whole, greppable)."""
    return lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False)


class Output:
    def __init__(self, console: Console, logger, run_dir: Path, active: bool = True):
        self.console, self.logger, self.run_dir, self.active = console, logger, Path(run_dir), active
        self.say = plain_lines(console) if active else (lambda line: None)

    @classmethod
    def silent(cls, run_dir: Path) -> "Output":
        return cls(Console(quiet=True), QuietLogger(), run_dir, active=False)

    def show(self, renderable) -> None:
        """Rich output (the method line, the before/after table); nothing in a silent process."""
        if self.active:
            self.console.print(renderable)

    def log(self, metrics: dict, step: int) -> None:
        self.logger.log(metrics, step=step)

    def write_json(self, name: str, payload: dict) -> None:
        if self.active:
            atomic_write_json(self.run_dir / name, payload)

    def write_text(self, name: str, text: str) -> None:
        if self.active:
            (self.run_dir / name).write_text(text)


def before_after_table(method: str, before: dict, after: dict, distilled: dict | None = None) -> Table:
    """The headline metrics the run has (no accuracy without an answer checker), before and after, for each
    evaluation set (kltd.train.evaluation.sets_result). With an RL stage, `distilled` (the evaluation after the
    distillation) stands between them, and the last column is what the RL stage changed."""
    sets = after.get("sets") or {after.get("set", "heldout"): after}
    title = "held-out evaluation" if list(sets) == ["heldout"] else "evaluation on " + ", ".join(sets)
    table = Table(title=f"{escape(method)}: {title}")  # a label such as "DAgger [kl_mix(0.5)]" is text
    columns = ("metric", "before", "after") if distilled is None else ("metric", "before", "distilled", "after RL")
    for column in (*columns, "change" if distilled is None else "RL change"):
        table.add_column(column, justify="left" if column == "metric" else "right")

    def of(result: dict, name: str) -> dict:
        return (result.get("sets") or {}).get(name, result if name == result.get("set", "heldout") else {})

    for name, later in sets.items():
        rows = [of(before, name), *([] if distilled is None else [of(distilled, name)]), later]
        for key in (k for k in (HEADLINE if len(sets) == 1 else SET_HEADLINE) if any(k in row for row in rows)):
            shown = [f"{row[key]:.4g}" if key in row else "-" for row in rows]
            earlier = rows[-2]
            change = f"{later[key] - earlier[key]:+.4g}" if key in earlier and key in later else "-"
            table.add_row(key if len(sets) == 1 else f"{name} {key}", *shown, change)
    return table


def evaluation_table(label: str, result: dict) -> Table:
    """One evaluation's headline figures on each set, with their bootstrap intervals (kltd eval)."""
    table = Table(title=f"{escape(label)}: evaluation")
    for column in ("set", "metric", "value", "95% interval"):
        table.add_column(column, justify="left" if column in ("set", "metric") else "right")
    for name, figures in (result.get("sets") or {"": result}).items():
        spans = figures.get("intervals") or {}
        for key in (k for k in HEADLINE if k in figures):
            span = spans.get(key)
            table.add_row(name, key, f"{figures[key]:.4g}", f"{span[0]:.4g} to {span[1]:.4g}" if span else "-")
    return table


def data_lines(summary: dict) -> list[str]:
    """One line about the data (bad rows dropped counted by reason), and one for each note on how prompts were
    rendered."""
    from kltd.data.rows import describe_bad_rows

    s, bad = summary, summary.get("bad_rows_dropped") or {}
    first = (f"data: {s['where']} ({s['format']}): {s['train_examples']} training and {s['eval_examples']} "
             f"held-out examples, checker {s['checker']}"
             + (f"; {sum(bad.values())} bad rows dropped ({describe_bad_rows(bad)})" if bad else "")
             + (f"; {s['dropped']} rows dropped" if s["dropped"] else "")
             + (f"; {s['truncated']} truncated" if s["truncated"] else "")
             + (" (data.max_prompt_tokens / data.max_response_tokens)" if s["dropped"] or s["truncated"] else ""))
    return [first, *(f"data: {note}" for note in s.get("notes", []))]


def save_student(model, tokenizer, run_dir: Path, weights: dict | None = None, name: str = "checkpoint") -> Path:
    """The trained student in Hugging Face format, in checkpoint/ (or `name`/). Atomic (kltd.files): a directory
    that exists is complete. `weights`: the whole weights of a sharded model (kltd.train.sharding.whole_weights)."""

    def write(directory: Path) -> None:
        if weights is None:
            model.save_pretrained(directory, safe_serialization=True)
        else:  # save_pretrained reads the (sharded) parameters themselves: the same files, written here
            directory.mkdir(parents=True)
            model.config.save_pretrained(directory)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(directory)
            save_weights(weights, directory / "model.safetensors")
        tokenizer.save_pretrained(directory)

    try:
        return atomic_write_dir(run_dir / name, write)
    except DiskFull as full:  # the training checkpoints are intact: a rerun resumes from the newest
        raise checkpoint.resumable(full, run_dir) from full.__cause__


def save_lora_student(pair, run_dir: Path, merged: bool, name: str = "adapter") -> tuple[Path, Path | None]:
    """A LoRA student's results: its adapter in peft's format with the tokenizer, in adapter/ (or `name`/)
    (PeftModel.from_pretrained(model.student, adapter/) loads it), and with `merged` (model.lora.save_merged) the
    merged model in checkpoint/, a plain Hugging Face directory (AutoModelForCausalLM loads it). Each atomic."""
    from kltd.train.lora import merged_weights, save_adapter

    def write_adapter(directory: Path) -> None:
        save_adapter(pair.adapter, directory)
        pair.tokenizer.save_pretrained(directory)

    try:
        adapter = atomic_write_dir(run_dir / name, write_adapter)
    except DiskFull as full:
        raise checkpoint.resumable(full, run_dir) from full.__cause__
    if not merged:
        return adapter, None
    weights = {name: tensor.cpu().contiguous() for name, tensor in merged_weights(pair.student).items()}
    return adapter, save_student(pair.student, pair.tokenizer, run_dir, weights)
