"""The method matrix: which (prefix, trajectory) cells are valid, which KL direction each trajectory
stands for, and what each cell is called.

This module is the one table of trajectories and their divergences: the trainer, the losses and the
labels all read it. Names are derived from the cell, never typed by hand; docs/theory.md says where each
name comes from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kltd.schema.choices import PREFIXES, TRAJECTORIES
from kltd.schema.divergences import DEFAULTS, parameter_value
from kltd.schema.divergences import entry as divergence_entry

__all__ = ["PREFIXES", "TRAJECTORIES", "METHOD_NAMES", "Trajectory", "TRAJECTORY", "cell_error", "method_name",
           "method_label", "slug", "direction_of", "direction_error", "own_divergence"]


@dataclass(frozen=True)
class Trajectory:
    """Whose next-token choice supervises the student, and the KL direction that choice fixes."""

    name: str
    direction: str | None  # "forward" (teacher's distribution), "reverse" (student's choices), None (dataset)
    divergence: str | None  # its own per-token divergence; None: cross-entropy on the dataset's token
    meaning: str


TRAJECTORY = {
    "expert": Trajectory("expert", "forward", "forward_kl", "the teacher's distribution: KL(p||q)"),
    "student": Trajectory("student", "reverse", "reverse_kl", "the student's own choices graded by the teacher: KL(q||p)"),
    "dataset": Trajectory("dataset", None, None, "the dataset's next token: cross-entropy"),
}
assert tuple(TRAJECTORY) == TRAJECTORIES

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


def own_divergence(trajectory: str) -> str | None:
    """The divergence a trajectory stands for: expert -> forward_kl, student -> reverse_kl, dataset -> None."""
    return TRAJECTORY[trajectory].divergence


def direction_of(divergence: str, **parameters) -> str | None:
    """"forward" or "reverse" when the divergence (with these parameters: beta, alpha, mix) is exactly one KL
    direction, else None (a blend: JSD, a skew, TV, a KL mix strictly between its ends). The divergence table
    (kltd.schema.divergences) says which."""
    return divergence_entry(divergence).direction(parameter_value(divergence, **parameters))


def direction_error(trajectory: str, divergence: str | None, **parameters) -> str | None:
    """Why a divergence cannot be filed under this trajectory, or None.

    The trajectory axis fixes the KL direction: forward KL under trajectory=student would be DAgger's loss filed
    under OPD's name (and the reverse), so the run would sit in the wrong column of the matrix. A blend computes
    the same loss under either trajectory, so it is filed under the one whose KL it weighs more (the expert's on
    a tie) and refused under the other: one computation, one name.
    """
    own = TRAJECTORY[trajectory]
    if divergence is None or own.direction is None:
        return None
    d = divergence_entry(divergence)
    w = parameter_value(divergence, **parameters)
    pure = d.direction(w)
    leaning = pure or d.leans(w)
    if leaning == own.direction:
        return None
    right = next(t for t in TRAJECTORY.values() if t.direction == leaning)
    shown = d.tag(w)
    if pure:
        return (f"loss.divergence={shown} is the {pure} KL, which is trajectory={right.name}'s own divergence; "
                f"trajectory={trajectory} means {own.meaning}. Use trajectory={right.name} "
                f"(and drop loss.divergence), or a blend (jsd, kl_mix, tv, skew_kl) to mix the two")
    weighs = ("the reverse KL more than the forward" if leaning == "reverse"
              else "the forward KL at least as much as the reverse")
    return (f"loss.divergence={shown} weighs {weighs}, so it is filed under trajectory={right.name} (the same loss "
            f"under trajectory={trajectory} would be a second name for it); use trajectory={right.name}")


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


def divergence_tag(divergence: str, beta: float = DEFAULTS["beta"], alpha: float = DEFAULTS["alpha"],
                   mix: float = DEFAULTS["mix"]) -> str:
    """'jsd' with beta 0.1 -> 'jsd(0.1)': the parameter that matters for each divergence."""
    return divergence_entry(divergence).tag(parameter_value(divergence, beta=beta, alpha=alpha, mix=mix))


def method_label(prefix: str, trajectory: str, *, reward="none", handoff=False, divergence=None,
                 beta=DEFAULTS["beta"], alpha=DEFAULTS["alpha"], mix=DEFAULTS["mix"], student_fraction=None,
                 kl_prefix_weight=0.0, estimator="exact", top_k=8, schedule: str | None = None,
                 horizon: str | None = None, rl: str = "none", lora: str | None = None) -> str:
    """The method name plus what sets this run apart within its cell: a blend in place of the trajectory's
    own divergence, an estimator in place of the exact divergence (~topk(8), ~sampled_k2), the student fraction
    of a mixture, the prefix term. Runs with equal labels are seeds of one method. `schedule`: a scheduled
    parameter's course ('0.1→0.9 cosine'), shown in its place; `mix` is then its mean, which files the blend.
    `horizon`: a scheduled training horizon ('32→128 gated at H≥0.3'); `rl`: an RL stage after the distillation
    ('DAgger → GRPO'); `lora`: a LoRA student's adapter ('lora(16)', 'qlora(16)'): another model than the whole
    student trained."""
    label = method_name(prefix, trajectory, reward=reward, handoff=handoff)
    if prefix == "mixed" and student_fraction is not None:
        label += f" λ={student_fraction:g}"
    own = TRAJECTORY[trajectory].direction
    if divergence and divergence != own_divergence(trajectory) and not (
            own and direction_of(divergence, beta=beta, alpha=alpha, mix=mix) == own):
        label += f" [{divergence}({schedule})]" if schedule else f" [{divergence_tag(divergence, beta, alpha, mix)}]"
    if estimator != "exact" and trajectory != "dataset":
        label += f" ~topk({top_k})" if estimator == "topk" else f" ~{estimator}"
    if kl_prefix_weight:
        label += f" +prefix({kl_prefix_weight:g})"
    if horizon:
        label += f" len({horizon})"
    if lora:
        label += f" {lora}"
    if rl != "none":
        label += f" → {rl.upper()}"
    return label
