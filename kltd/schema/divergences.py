"""The divergence table: every per-token divergence D(p, q) kltd knows, p = teacher, q = student, one entry each.

An entry says everything the rest of kltd asks of a divergence: its formula (written against the few
operations kltd.objectives.divergences supplies, so this module needs no torch), the parameter that shapes
it and its default, the weights of the two KLs where it is exactly a weighting of them (the fused head's
closed-form gradient, the matrix's "this is one KL direction" rule), the KL it leans to (the trajectory a
blend is filed under: one computation, one name), its one-token estimators, and its label.

Adding a divergence is one entry here, one file in conf/divergence/ and one test against a direct formula
(tests/objectives/test_divergences.py checks every entry).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FORWARD, REVERSE = "forward", "reverse"
PARAMETERS = ("beta", "alpha", "mix")  # the loss.* keys a divergence may read (LossConfig, DivergenceSpec)


@dataclass(frozen=True)
class Divergence:
    name: str
    formula: str  # what it computes, for the docs and `kltd train --help`
    # compute(ops, log_q, log_p, w) -> [...]: log_q, log_p are [..., V] log-probabilities; `ops` gives kl(a, b)
    # = KL(a||b), mix(a, b, w) = log(w a + (1 - w) b), tv(log_q, log_p) and zeros(log_q); w is the parameter
    compute: Callable
    parameter: str | None = None  # "beta", "alpha" or "mix"; None: none
    default: float | None = None
    # (forward, reverse) where D = forward * KL(p||q) + reverse * KL(q||p) at this parameter value; None elsewhere
    kl_weights: Callable[[float | None], tuple[float, float] | None] = lambda w: None
    # the KL direction that carries at least as much weight (FORWARD on a tie): a blend is filed under the
    # trajectory of that direction and refused under the other, so one computation never has two names
    leans: Callable[[float | None], str] = lambda w: FORWARD
    one_token: tuple[str, ...] = ()  # the loss.estimator=sampled_* defined for it (kltd.objectives.estimators)

    def tag(self, w: float | None) -> str:
        """'jsd(0.1)': the name and, for a parameterised divergence, its value."""
        return f"{self.name}({w:g})" if self.parameter else self.name

    def direction(self, w: float | None) -> str | None:
        """FORWARD or REVERSE where the divergence is exactly one KL at this value, else None (a blend)."""
        return {(1.0, 0.0): FORWARD, (0.0, 1.0): REVERSE}.get(self.kl_weights(w))


def _ends(w: float) -> tuple[float, float] | None:
    return {0.0: (1.0, 0.0), 1.0: (0.0, 1.0)}.get(w)


def _jsd(ops, log_q, log_p, beta):
    if beta in (0.0, 1.0):  # TRL's convention: the mixture form vanishes at the ends, defined as the KLs there
        return ops.kl(log_p, log_q) if beta == 0.0 else ops.kl(log_q, log_p)
    log_m = ops.mix(log_p, log_q, beta)
    return beta * ops.kl(log_p, log_m) + (1.0 - beta) * ops.kl(log_q, log_m)


def _skew(ops, log_a, log_b, alpha):
    """KL(a || alpha a + (1 - alpha) b): alpha = 0 is KL(a || b), alpha = 1 is 0."""
    if alpha == 0.0:
        return ops.kl(log_a, log_b)
    return ops.zeros(log_a) if alpha == 1.0 else ops.kl(log_a, ops.mix(log_a, log_b, alpha))


TABLE: dict[str, Divergence] = {d.name: d for d in (
    Divergence("forward_kl", "KL(p || q)", lambda ops, q, p, w: ops.kl(p, q),
               kl_weights=lambda w: (1.0, 0.0), one_token=("sampled_k1", "sampled_k3")),
    Divergence("reverse_kl", "KL(q || p)", lambda ops, q, p, w: ops.kl(q, p),
               kl_weights=lambda w: (0.0, 1.0), leans=lambda w: REVERSE,
               one_token=("sampled_k1", "sampled_k2", "sampled_k3", "sampled_reward")),
    Divergence("jsd", "TRL's generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; "
               "KL(p || q) at beta 0, KL(q || p) at beta 1", _jsd, "beta", 0.5, _ends,
               leans=lambda beta: REVERSE if beta > 0.5 else FORWARD),
    Divergence("jsd_scaled", "jsd / (beta (1 - beta)), continuous on [0, 1]: KL(p || q) at 0, KL(q || p) at 1",
               lambda ops, q, p, b: _jsd(ops, q, p, b) if b in (0.0, 1.0) else _jsd(ops, q, p, b) / (b * (1.0 - b)),
               "beta", 0.5, _ends, leans=lambda beta: REVERSE if beta > 0.5 else FORWARD),
    Divergence("skew_kl", "KL(p || alpha p + (1 - alpha) q) (DistiLLM's skew KL)",
               lambda ops, q, p, a: _skew(ops, p, q, a), "alpha", 0.1,
               kl_weights=lambda a: (1.0, 0.0) if a == 0.0 else None),
    Divergence("skew_reverse_kl", "KL(q || alpha q + (1 - alpha) p) (DistiLLM's skew reverse KL)",
               lambda ops, q, p, a: _skew(ops, q, p, a), "alpha", 0.1,
               kl_weights=lambda a: (0.0, 1.0) if a == 0.0 else None, leans=lambda a: REVERSE),
    Divergence("tv", "total variation: 0.5 sum |p - q|", lambda ops, q, p, w: ops.tv(q, p)),
    Divergence("kl_mix", "(1 - mix) KL(p || q) + mix KL(q || p) (the paper's KL mixing)",
               lambda ops, q, p, m: (1.0 - m) * ops.kl(p, q) + m * ops.kl(q, p), "mix", 0.5,
               kl_weights=lambda m: (1.0 - m, m), leans=lambda m: REVERSE if m > 0.5 else FORWARD),
)}

NAMES = tuple(TABLE)
DEFAULTS = {entry.parameter: entry.default for entry in TABLE.values() if entry.parameter}  # beta, alpha, mix
# a parameter is a loss.* key, so the divergences that read one share its default
assert set(DEFAULTS) == set(PARAMETERS) and all(
    entry.default == DEFAULTS[entry.parameter] for entry in TABLE.values() if entry.parameter)


def entry(name: str) -> Divergence:
    if name not in TABLE:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(NAMES)}")
    return TABLE[name]


def parameter_value(name: str, **parameters) -> float | None:
    """The value of the parameter `name` reads, from keyword arguments beta, alpha, mix (defaults if absent)."""
    key = entry(name).parameter
    return None if key is None else parameters.get(key, DEFAULTS[key])


def one_token_estimators() -> dict[str, tuple[str, ...]]:
    """divergence -> the sampled estimators defined for it (only the two KLs have any)."""
    return {name: d.one_token for name, d in TABLE.items() if d.one_token}
