"""Run directories on disk: finding them under a path and reading each into a `Run`.

A run directory holds metrics.json (the final summary) and metrics.jsonl (one line per logged step).
A directory with .hydra/ but no metrics.json is a cell that never finished: it loads as "missing",
never dropped, so a sweep's holes stay visible. Nothing here imports Hydra.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from kltd.schema.matrix import METHOD_NAMES, cell_error, method_name, slug

SUMMARY_FILE = "metrics.json"
HISTORY_FILE = "metrics.jsonl"
SWEEP_MARKER = "multirun.yaml"  # Hydra writes it at the top of every -m sweep directory
NOT_RUNS = {".hydra", "wandb", "checkpoint", "checkpoint.tmp", "__pycache__"}
# Config keys that say which cell or which seed a run is, not how it was trained.
IDENTITY_KEYS = {"seed", "method", "prefix.source", "trajectory.supervisor"}
IDENTITY_PREFIXES = ("wandb.",)


class CompareError(Exception):
    """A problem the user can fix (a path, a metric name); shown as one line."""


@dataclass
class Run:
    run_dir: Path
    status: str  # "completed", "failed" or "missing"
    method: str | None
    prefix: str | None
    trajectory: str | None
    seed: int | None
    sweep: str | None
    error: str | None = None
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    variant: str = ""  # the config values that set this run apart from others of its method, e.g. "trainer.lr=0.001"

    @property
    def eval_after(self) -> dict:
        return self.summary.get("eval_after") or {}

    @property
    def eval_before(self) -> dict:
        return self.summary.get("eval_before") or {}

    @property
    def eval_before_rl(self) -> dict:
        """With an RL stage (rl=grpo): the evaluation after the distillation, before the RL stage ({} without one)."""
        return self.summary.get("eval_after_distillation") or {}

    @property
    def label(self) -> str:
        name = self.method or "unknown method"
        return f"{name} [{self.variant}]" if self.variant else name

    @property
    def status_text(self) -> str:
        return f"failed: {self.error}" if self.status == "failed" else self.status

    def costs(self) -> dict[str, float | None]:
        """wall time, steps and token counts; tokens_generated is student + teacher (the sampling bill)."""
        tokens = self.summary.get("tokens") or {}
        costs = {key: self.summary.get(key) for key in ("wall_time_s", "train_time_s", "steps", "steps_per_s", "final_loss")}
        costs.update({f"tokens_{key}": value for key, value in tokens.items()})
        generated = [tokens.get("student_generated"), tokens.get("teacher_generated")]
        costs["tokens_generated"] = sum(generated) if all(is_number(v) for v in generated) else None
        return costs


def figure(block: dict, metric: str):
    """One evaluation's figure: `metric` of its first set, or `set/metric` of any set (eval.sets)."""
    if "/" in metric:
        name, _, key = metric.partition("/")
        return ((block.get("sets") or {}).get(name) or {}).get(key)
    return block.get(metric)


def figure_names(block: dict) -> list[str]:
    """Every numeric figure of an evaluation: the first set's by name, each set's as set/metric (several sets)."""
    names = [k for k, v in block.items() if is_number(v)]
    sets = block.get("sets") or {}
    if len(sets) > 1:
        names += [f"{name}/{k}" for name, figures in sets.items() for k, v in figures.items() if is_number(v)]
    return names


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_run_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() or (path / ".hydra").is_dir() or (path / HISTORY_FILE).is_file()


def _natural_key(path: Path):
    # Hydra numbers jobs 0, 1, ..., 10: sort them as numbers, not as text.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def find_run_dirs(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """Every run directory at or below `path`; a run's own subdirectories are not searched."""
    seen = set() if seen is None else seen
    real = path.resolve()
    if real in seen:  # symlink loops, or the same run given twice
        return []
    seen.add(real)
    if is_run_dir(path):
        return [path]
    try:
        children = sorted((c for c in path.iterdir() if c.is_dir()), key=_natural_key)
    except OSError:
        return []
    found = []
    for child in children:
        if child.name not in NOT_RUNS and not child.name.startswith("."):
            found += find_run_dirs(child, seen)
    return found


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        return None, f"unreadable {path.name} ({type(error).__name__})"
    return (data, None) if isinstance(data, dict) else (None, f"unreadable {path.name} (not an object)")


def read_history(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows; a half-written last line (a run still going) is skipped."""
    try:
        lines = (run_dir / HISTORY_FILE).read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and is_number(row.get("step")):
            rows.append(row)
    return rows


def read_saved_config(run_dir: Path) -> dict:
    """The config of a run that wrote no summary: Hydra's copy, read as plain YAML (no Hydra import)."""
    try:
        import yaml  # comes with omegaconf; without it the directory name still tells the cell
    except ImportError:
        return {}
    for candidate in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        try:
            data = yaml.safe_load(candidate.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            return data
    return {}


_SLUG_TO_CELL = {slug(name): cell for cell, name in METHOD_NAMES.items()}
_RUN_DIR_NAME = re.compile(r"^(?:[^_]*_)?(?P<slug>[a-z0-9-]+)_s(?P<seed>\d+)$")  # 3_dagger_s0, 09-00-00_sft_s1


def _cell_from_dir_name(run_dir: Path) -> tuple[str | None, str | None, int | None]:
    match = _RUN_DIR_NAME.match(run_dir.name)
    if not match or match["slug"] not in _SLUG_TO_CELL:
        return None, None, None
    prefix, trajectory = _SLUG_TO_CELL[match["slug"]]
    return prefix, trajectory, int(match["seed"])


class _Attributes:
    """A nested dict read with attribute access, as the typed config is."""

    def __init__(self, values: dict):
        self._values = values

    def __getattr__(self, name: str):
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(name) from None
        return _Attributes(value) if isinstance(value, dict) else value


def _label_from_config(config: dict) -> str | None:
    """The method label the trainer would have written (e.g. "GKD λ=0.9"), for a run that never wrote it,
    so a missing seed joins its method's row."""
    from kltd.schema.config import config_method_label

    try:
        return config_method_label(_Attributes(config)) if config else None
    except Exception:  # a config from another kltd version: fall back to the plain cell name
        return None


def _identity(summary: dict, config: dict, run_dir: Path) -> dict:
    """method, prefix, trajectory, seed, sweep: from the summary, else the saved config, else the dir name. A
    `kltd eval` result (kind: eval) is no cell of the matrix: a row of the tables beside the runs."""
    if summary.get("kind") == "eval":
        return dict(method=summary.get("method"), prefix=None, trajectory=None, seed=summary.get("seed"),
                    sweep=summary.get("sweep") or (run_dir.parent.name if (run_dir.parent / SWEEP_MARKER).is_file()
                                                   else None))
    prefix = summary.get("prefix") or (config.get("prefix") or {}).get("source")
    trajectory = summary.get("trajectory") or (config.get("trajectory") or {}).get("supervisor")
    seed = summary.get("seed", config.get("seed"))
    if prefix is None or trajectory is None:
        prefix, trajectory, seed_from_name = _cell_from_dir_name(run_dir)
        seed = seed if seed is not None else seed_from_name
    method = summary.get("method")
    if method is None and prefix and trajectory and not cell_error(prefix, trajectory):
        method = _label_from_config(config) or method_name(prefix, trajectory)
    sweep = summary.get("sweep") or (run_dir.parent.name if (run_dir.parent / SWEEP_MARKER).is_file() else None)
    return dict(method=method, prefix=prefix, trajectory=trajectory, seed=seed, sweep=sweep)


def load_run(run_dir: Path) -> Run:
    summary, unreadable = _read_json(run_dir / SUMMARY_FILE)
    summary = summary or {}
    config = summary.get("config") if isinstance(summary.get("config"), dict) else read_saved_config(run_dir)
    if unreadable:
        status, error = "failed", unreadable
    elif not summary:
        status, error = "missing", None
    elif summary.get("status", "completed" if "eval_after" in summary else None) == "completed":
        status, error = "completed", None  # summaries from before the status field count when they have results
    else:
        status, error = "failed", summary.get("error") or f"status {summary.get('status')!r}"
    return Run(run_dir=run_dir, status=status, error=error, summary=summary, history=read_history(run_dir),
               config=config or {}, **_identity(summary, config or {}, run_dir))


def _flatten(config: dict, parent: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        name = f"{parent}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, str) and "${" in value:
            continue  # unresolved interpolation (Hydra's own copy): not comparable with resolved values
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def label_variants(runs: list[Run]) -> None:
    """Within each method, name the config keys that differ between its runs (a sweep over lr, say), so
    seeds of one setting are averaged together and different settings never into one number."""
    by_method: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_method[(run.method, run.prefix, run.trajectory)].append(run)
    for group in by_method.values():
        flat = [_flatten(run.config) for run in group]
        keys = sorted({key for config in flat for key in config})
        varying = [key for key in keys if key not in IDENTITY_KEYS and not key.startswith(IDENTITY_PREFIXES)
                   and len({repr(config[key]) for config in flat if key in config}) > 1]
        for run, config in zip(group, flat):
            run.variant = ", ".join(f"{key}={config[key]}" for key in varying if key in config)


def load_runs(paths: list[Path]) -> list[Run]:
    seen: set[Path] = set()
    run_dirs = []
    for path in paths:
        if not path.exists():
            raise CompareError(f"no such directory: {path}")
        if path.is_file():
            if path.name != SUMMARY_FILE:
                raise CompareError(f"not a directory: {path} (give a run directory or a sweep directory)")
            path = path.parent
        run_dirs += find_run_dirs(path, seen)
    if not run_dirs:
        shown = ", ".join(str(p) for p in paths)
        raise CompareError(f"no runs found under {shown} (a run directory has {SUMMARY_FILE} or .hydra/)")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    label_variants(runs)
    return runs
