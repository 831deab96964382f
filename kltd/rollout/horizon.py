"""The training horizon: how many tokens a sampled training state may hold, step by step (sampling.length_schedule).

    fixed          sampling.max_new_tokens throughout
    steps          sampling.lengths[i] from optimiser step sampling.length_steps[i - 1] on (lengths[0] from step 1)
    entropy_gated  the paper's length curriculum: start at lengths[0]; at each evaluation during training (eval.every)
                   move to the next length only if the held-out per-token entropy of the student's samples (the
                   first set of eval.sets, eval/student_entropy) is at least sampling.entropy_min (H_min), else stay.
                   A low entropy means the student has grown confident (or collapsed) at the current horizon; the
                   curriculum lengthens its states only while it still explores.

The gate reads every evaluation, not only the first one below H_min: an entropy that recovers lets the horizon grow
again. The horizon's state (the gated length and its decisions) is part of the trainer's checkpoint, so a resumed
run gates as the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GateDecision:
    step: int  # the optimiser step whose evaluation decided
    entropy: float  # held-out per-token entropy there (nats)
    entropy_min: float
    before: int  # the horizon up to this step
    after: int  # the horizon from the next step on

    @property
    def advanced(self) -> bool:
        return self.after > self.before

    def line(self) -> str:
        verdict = (f">= H_min {self.entropy_min:g}: horizon {self.before} -> {self.after} tokens" if self.advanced else
                   f"< H_min {self.entropy_min:g}: horizon stays {self.before} tokens")
        return f"length gate after step {self.step}: held-out entropy {self.entropy:.4g} {verdict}"

    def logged(self) -> dict:
        return {"gate/entropy": self.entropy, "gate/advanced": float(self.advanced), "gate/max_new_tokens": self.after}


@dataclass
class Horizon:
    """The horizon of one run. `schedule`, `lengths`, `length_steps`, `entropy_min`: as sampling.* says."""

    schedule: str = "fixed"
    lengths: list[int] = field(default_factory=list)
    length_steps: list[int] = field(default_factory=list)
    entropy_min: float | None = None
    index: int = 0  # entropy_gated: which length is in use
    decisions: list[GateDecision] = field(default_factory=list)

    @classmethod
    def of(cls, sampling) -> Horizon:
        if sampling.length_schedule == "fixed":
            return cls(lengths=[sampling.max_new_tokens])
        return cls(sampling.length_schedule, list(sampling.lengths), list(sampling.length_steps or []),
                   sampling.entropy_min)

    @property
    def scheduled(self) -> bool:
        return self.schedule != "fixed"

    def length(self, step: int) -> int:
        """The horizon of optimiser step `step` (1-based)."""
        if self.schedule == "steps":
            return self.lengths[sum(start <= step for start in self.length_steps)]
        return self.lengths[self.index]

    def gate(self, step: int, entropy: float) -> GateDecision | None:
        """The decision after the evaluation at `step`; None when there is nothing to decide (not gated, or at the
        last length already)."""
        if self.schedule != "entropy_gated" or self.index == len(self.lengths) - 1:
            return None
        before = self.lengths[self.index]
        if entropy >= self.entropy_min:
            self.index += 1
        decision = GateDecision(step, entropy, self.entropy_min, before, self.lengths[self.index])
        self.decisions.append(decision)
        return decision

    def state_dict(self) -> dict:
        return {"index": self.index, "decisions": [asdict(d) for d in self.decisions]}

    def load_state_dict(self, state: dict | None) -> None:
        """A checkpoint from before length schedules has no state: the gate had not moved."""
        state = state or {"index": 0, "decisions": []}
        self.index = state["index"]
        self.decisions = [GateDecision(**d) for d in state["decisions"]]

    def record(self, last_step: int) -> dict | None:
        """What metrics.json keeps of a scheduled horizon: the schedule, the horizon at the end, every decision."""
        if not self.scheduled:
            return None
        return {"schedule": self.schedule, "lengths": self.lengths, "length_steps": self.length_steps or None,
                "entropy_min": self.entropy_min, "final": self.length(last_step),
                "decisions": [asdict(d) for d in self.decisions]}
