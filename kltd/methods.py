"""The method matrix: which (prefix, trajectory) cells are valid and what each one is called.

Names are derived from the cell, never typed by hand (design §4). See docs/theory.md for where each
name comes from.
"""

from __future__ import annotations

import re

PREFIXES = ("fixed", "teacher", "student", "mixed")
TRAJECTORIES = ("expert", "student", "dataset")

METHOD_NAMES: dict[tuple[str, str], str] = {
    ("fixed", "expert"): "SFT",
    ("fixed", "student"): "Offline RL",
    ("fixed", "dataset"): "BC",
    ("teacher", "expert"): "SeqKD",
    ("teacher", "student"): "Teacher-prefix RKL",
    ("student", "expert"): "DAgger",
    ("student", "student"): "OPD",
    ("mixed", "expert"): "GKD",
    ("mixed", "student"): "GKD-RKL",
}

# A dataset only has a next token at its own states, so it can only supervise fixed prefixes.
_DATASET_ONLY_ON_FIXED = (
    "a dataset has no next token at {prefix}-sampled states; "
    "use trajectory=expert or trajectory=student with prefix={prefix}, or prefix=fixed with trajectory=dataset"
)


def cell_error(prefix: str, trajectory: str) -> str | None:
    """Why a cell is invalid, or None if it is valid."""
    if prefix not in PREFIXES:
        return f"unknown prefix '{prefix}'; choose one of {', '.join(PREFIXES)}"
    if trajectory not in TRAJECTORIES:
        return f"unknown trajectory '{trajectory}'; choose one of {', '.join(TRAJECTORIES)}"
    if trajectory == "dataset" and prefix != "fixed":
        return f"invalid cell prefix={prefix} x trajectory=dataset: " + _DATASET_ONLY_ON_FIXED.format(prefix=prefix)
    return None


def method_name(prefix: str, trajectory: str, reward: str = "none") -> str:
    """The method a cell computes. A reward turns plain behaviour cloning into offline RL."""
    error = cell_error(prefix, trajectory)
    if error:
        raise ValueError(error)
    if (prefix, trajectory) == ("fixed", "dataset") and reward != "none":
        return "Offline RL (reward-weighted)"
    return METHOD_NAMES[(prefix, trajectory)]


def slug(name: str) -> str:
    """A file-system and W&B friendly form of a method name: 'Offline RL' -> 'offline-rl'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
