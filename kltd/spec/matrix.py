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


def method_name(prefix: str, trajectory: str, reward: str = "none", handoff: bool = False) -> str:
    """The method a cell computes. A reward turns plain behaviour cloning into offline RL; a hand-off
    (student rolls in, teacher rolls out) marks the mixed cells."""
    error = cell_error(prefix, trajectory)
    if error:
        raise ValueError(error)
    if (prefix, trajectory) == ("fixed", "dataset") and reward != "none":
        return "Offline RL (reward-weighted)"
    name = METHOD_NAMES[(prefix, trajectory)]
    return f"{name} hand-off" if handoff and prefix == "mixed" else name


def slug(name: str) -> str:
    """A file-system and W&B friendly form of a method name: 'Offline RL' -> 'offline-rl'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


DEFAULT_DIVERGENCE = {"expert": "forward_kl", "student": "reverse_kl"}


def divergence_tag(divergence: str, beta: float, alpha: float, mix: float) -> str:
    """'jsd' with beta 0.1 -> 'jsd(0.1)': the parameter that matters for each divergence."""
    parameter = {"jsd": beta, "jsd_scaled": beta, "skew_kl": alpha, "skew_reverse_kl": alpha, "kl_mix": mix}
    return f"{divergence}({parameter[divergence]:g})" if divergence in parameter else divergence


def method_label(prefix: str, trajectory: str, *, reward="none", handoff=False, divergence=None, beta=0.5,
                 alpha=0.1, mix=0.5, student_fraction=None, kl_prefix_weight=0.0) -> str:
    """The method name plus what sets this run apart within its cell: a divergence other than the
    trajectory's own, the student fraction of a mixture, the prefix term. Runs with equal labels are
    seeds of one method."""
    label = method_name(prefix, trajectory, reward=reward, handoff=handoff)
    if prefix == "mixed" and student_fraction is not None:
        label += f" λ={student_fraction:g}"
    if divergence and divergence != DEFAULT_DIVERGENCE.get(trajectory):
        label += f" [{divergence_tag(divergence, beta, alpha, mix)}]"
    if kl_prefix_weight:
        label += f" +prefix({kl_prefix_weight:g})"
    return label
