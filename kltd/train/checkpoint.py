"""Training checkpoints: everything a run needs to go on exactly where it stopped.

A checkpoint is a directory checkpoints/step-000050/ holding the student's weights (safetensors; a LoRA student's
adapter alone, in peft's format in adapter/, its frozen base being model.student's own files), the
trainer's state (optimiser, schedule, every random stream, the data position; kltd.train.trainer
Trainer.state_dict), the run's progress (counters, the evaluation before training) and the resolved config
it was made under. Each is written whole (kltd.files) and the newest `keep` are kept; the older ones are
removed only once the new one is in place, so a save that fails (a full disk: DiskFull, naming the
checkpoint a rerun resumes from) leaves the ones before intact. Loading tries the newest first and falls
back to the one before if it is unreadable, with a warning; it first removes the temporaries a killed
writer left in the run directory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kltd.files import DiskFull, atomic_write_dir, remove_stale_temporaries
from kltd.train.sharding import load_weights, save_weights, whole_weights

DIRECTORY = "checkpoints"
WEIGHTS, TRAINER, PROGRESS = "model.safetensors", "trainer.pt", "progress.json"
ADAPTER = "adapter"  # a LoRA student's checkpoint: the adapter (kltd.train.lora), in place of WEIGHTS


@dataclass
class Progress:
    """What the training loop has accumulated by a step."""

    step: int = 0
    loss: float = float("nan")
    train_time_s: float = 0.0
    tokens: dict = field(default_factory=lambda: {"student_generated": 0, "teacher_generated": 0, "scored": 0})
    trained_tokens: int = 0
    eval_before: dict | None = None
    eval_after_distillation: dict | None = None  # with an RL stage (rl=grpo): the evaluation before it


@dataclass
class Checkpoint:
    path: Path
    progress: Progress
    config: dict
    trainer_state: dict

    def restore(self, trainer) -> None:
        if (self.path / ADAPTER).is_dir():
            from kltd.train.lora import load_adapter

            if getattr(trainer, "adapter", None) is None:
                raise RuntimeError(f"{self.path} holds a LoRA adapter, and this run's student has none")
            load_adapter(trainer.adapter, self.path / ADAPTER)
        else:
            load_weights(trainer.student, self.path / WEIGHTS, trainer.device)
        trainer.load_state_dict(self.trainer_state)


@dataclass
class Snapshot:
    """The student's weights and the trainer's state, whole (gathered from every process when sharded)."""

    weights: dict
    trainer_state: dict
    adapter: object = None  # a LoRA student's peft wrapper: its adapter is saved in place of `weights` (empty)


def snapshot(trainer) -> Snapshot:
    """Every process of a sharded run calls it (gathering is collective); the process that saves keeps it. A LoRA
    student's adapter is written from the live wrapper by `save`, called at once."""
    adapter = getattr(trainer, "adapter", None)
    return Snapshot({} if adapter is not None else whole_weights(trainer.student), trainer.state_dict(), adapter)


def _name(step: int) -> str:
    return f"step-{step:06d}"


def path_for(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is (or will be) saved."""
    return Path(run_dir) / DIRECTORY / _name(step)


def saved(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / DIRECTORY
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / PROGRESS).is_file()) if root.is_dir() else []


def save(run_dir: Path, state: Snapshot, progress: Progress, config: dict, keep: int) -> Path:
    def write(directory: Path) -> None:
        directory.mkdir(parents=True)
        if state.adapter is not None:
            from kltd.train.lora import save_adapter

            save_adapter(state.adapter, directory / ADAPTER)
        else:
            save_weights(state.weights, directory / WEIGHTS)
        torch.save(state.trainer_state, directory / TRAINER)
        (directory / PROGRESS).write_text(json.dumps({"progress": asdict(progress), "config": config}, default=str))

    try:
        path = atomic_write_dir(path_for(run_dir, progress.step), write)
    except DiskFull as full:
        raise resumable(full, run_dir) from full.__cause__
    for old in saved(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def resumable(full: DiskFull, run_dir: Path) -> DiskFull:
    """The same full disk, naming the checkpoint that a rerun of the same command resumes from (if any)."""
    if full.resume_from is not None:
        return full
    done = saved(run_dir)
    return DiskFull(full.path, done[-1] if done else None)


def _load(path: Path) -> Checkpoint:
    record = json.loads((path / PROGRESS).read_text())
    state = torch.load(path / TRAINER, weights_only=True)  # plain tensors and numbers only: nothing executes
    from safetensors import safe_open

    from kltd.train.lora import ADAPTER_WEIGHTS

    weights = path / ADAPTER / ADAPTER_WEIGHTS if (path / ADAPTER).is_dir() else path / WEIGHTS
    with safe_open(str(weights), framework="pt"):  # the header reads: the file is whole
        pass
    return Checkpoint(path, Progress(**record["progress"]), record["config"], state)


def latest(run_dir: Path, echo=print) -> Checkpoint | None:
    """The newest checkpoint that loads; an unreadable one is skipped with a warning. Called where a run starts
    in `run_dir`: the temporaries that a killed writer left there first go (kltd.files.remove_stale_temporaries:
    a half-written checkpoint can be as big as a whole one)."""
    for directory in (Path(run_dir), Path(run_dir) / DIRECTORY):
        remove_stale_temporaries(directory)
    for path in reversed(saved(run_dir)):
        try:
            return _load(path)
        except Exception as error:  # a torn or corrupt file: fall back to the one before
            echo(f"warning: checkpoint {path} is unreadable ({type(error).__name__}); trying the one before")
    return None
