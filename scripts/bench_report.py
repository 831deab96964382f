"""The report of scripts/bench_vs_trl.py: the table, FLOP/s fractions, loss parity and the summary line.

Kept apart from the runs so that a saved run (`--json`) can be re-printed with `--report` and so the
measurement code stays about measuring.
"""

from __future__ import annotations

import math
import statistics

PARITY_TOLERANCE = 1e-5

# Which TRL setups each kltd case is compared with; runs go kltd, TRL, kltd, TRL, ... in this order.
TRL_SETUPS = {
    "opd": ["distill", "distill_nogc", "gkd1", "gkd1_nogc"],
    "fixed": ["gkd0", "gkd0_nogc"],
}
LABELS = {
    "kltd:opd": "kltd prefix=student trajectory=student",
    "kltd:fixed": "kltd prefix=fixed trajectory=expert",
    "trl:distill": "TRL DistillationTrainer beta=1 (GC on, default)",
    "trl:distill_nogc": "TRL DistillationTrainer beta=1 (GC off)",
    "trl:gkd1": "TRL GKDTrainer lmbda=1 beta=1 (GC on, default)",
    "trl:gkd1_nogc": "TRL GKDTrainer lmbda=1 beta=1 (GC off)",
    "trl:gkd0": "TRL GKDTrainer lmbda=0 beta=0 (GC on, default)",
    "trl:gkd0_nogc": "TRL GKDTrainer lmbda=0 beta=0 (GC off)",
}


def summarize(runs: list[dict]) -> dict:
    """Across runs of one setup: median of per-run median s/step, etc."""
    per_step = [statistics.median(r["times"]) for r in runs]
    tok_s = [sum(r["trained"]) / sum(r["times"]) for r in runs]
    peak = [(r["peak"] - r["baseline"]) / 2**20 for r in runs]
    real = [statistics.mean(r["real_tokens"]) for r in runs]
    trained = [statistics.mean(r["trained"]) for r in runs]
    return dict(s_step=statistics.median(per_step), s_min=min(per_step), s_max=max(per_step),
                tok_s=statistics.median(tok_s), peak_mb=statistics.median(peak), real_tokens=statistics.mean(real),
                trained_tokens=statistics.mean(trained), runs=len(runs), params=runs[0]["params"])


def model_flops_per_step(s: dict) -> float:
    """(6 N_student + 2 N_teacher) per token: the bodies on every real token, the output layers on the
    supervised ones (kltd projects only those; the work TRL does on prompt logits is not counted)."""
    (sb, sh), (tb, th) = s["params"]["student"], s["params"]["teacher"]
    return (6 * sb + 2 * tb) * s["real_tokens"] + (6 * sh + 2 * th) * s["trained_tokens"]


def fmt_ratio(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.3f}"


def paired_ratio(kltd_runs: list[dict], trl_runs: list[dict], setups: list[str], setup: str) -> float:
    """Median over rounds of (kltd run / the TRL run right after it): robust to load that drifts over time.

    Round r runs kltd, setups[0], kltd, setups[1], ...; so the kltd run paired with `setup` in round r is
    kltd_runs[r * len(setups) + setups.index(setup)]."""
    j, n = setups.index(setup), len(setups)
    return statistics.median(statistics.median(kltd_runs[r * n + j]["times"]) / statistics.median(t["times"])
                             for r, t in enumerate(trl_runs))


def report(data: dict) -> None:
    """Print the table, the FLOP/s fractions, parity and the final line from the collected runs."""
    runs, scales = data["runs"], [s["name"] for s in data["scales"]]
    summary = {key: summarize(value) for key, value in runs.items()}
    peak_rate = max(data["gflops"]) * 1e9
    ratios = {"opd": [], "fixed": [], "mem": []}
    print(f"\nfp32 matmul rate: {max(data['gflops']):.1f} GFLOP/s (best of start/end: "
          f"{', '.join(f'{g:.1f}' for g in data['gflops'])})")
    print("s/step: median over runs of each run's median step; kltd/this: ratio of those medians; paired: median "
          "over rounds of (kltd run / the TRL run right after it)")
    print(f"\n{'scale':<5} {'setup':<50} {'s/step':>8} {'(min-max over runs)':>19} {'tok/step':>8} "
          f"{'tok/s':>7} {'peak MB':>8} {'kltd/this':>9} {'paired':>7} {'mem k/this':>10}")
    for scale in scales:
        for case, setups in TRL_SETUPS.items():
            k_runs = runs[f"{scale}|kltd:{case}"]
            k = summary[f"{scale}|kltd:{case}"]
            rows = [(f"kltd:{case}", k, None)] + [
                (f"trl:{s}", summary[f"{scale}|trl:{s}"], paired_ratio(k_runs, runs[f"{scale}|trl:{s}"], setups, s))
                for s in setups]
            for key, s, paired in rows:
                mine = key.startswith("kltd")
                mem_ratio = k["peak_mb"] / s["peak_mb"] if s["peak_mb"] > 0 else float("nan")
                print(f"{scale:<5} {LABELS[key]:<50} {s['s_step']:8.3f} "
                      f"{'(' + format(s['s_min'], '.3f') + '-' + format(s['s_max'], '.3f') + ')':>19} "
                      f"{s['trained_tokens']:8.0f} {s['tok_s']:7.0f} {s['peak_mb']:8.0f} "
                      f"{'' if mine else format(k['s_step'] / s['s_step'], '.3f'):>9} "
                      f"{'' if mine else format(paired, '.3f'):>7} {'' if mine else format(mem_ratio, '.3f'):>10}")
            fastest = min(setups, key=lambda x: summary[f"{scale}|trl:{x}"]["s_step"])
            ratio = paired_ratio(k_runs, runs[f"{scale}|trl:{fastest}"], setups, fastest)
            ratios[case].append(ratio)
            print(f"{scale:<5} -> {case}: kltd / fastest TRL setup ({fastest}), paired = {ratio:.3f} "
                  f"(ratio of medians {k['s_step'] / summary[f'{scale}|trl:{fastest}']['s_step']:.3f})")
        if scale == scales[-1]:  # memory: against GKDTrainer (lower of its two settings) at the largest scale
            for case, setups in TRL_SETUPS.items():
                lowest = min(summary[f"{scale}|trl:{s}"]["peak_mb"] for s in setups if s.startswith("gkd"))
                ratios["mem"].append(summary[f"{scale}|kltd:{case}"]["peak_mb"] / max(lowest, 1e-9))
        for key in ("kltd:fixed", "trl:gkd0", "trl:gkd0_nogc"):
            s = summary[f"{scale}|{key}"]
            rate = model_flops_per_step(s) / s["s_step"]
            print(f"{scale:<5} fixed-prefix model FLOP/s, {key}: {rate / 1e9:.2f} GFLOP/s = "
                  f"{rate / peak_rate:.1%} of the matmul rate")

    print("\nloss parity (same batch, same logits; relative difference, tolerance 1e-5):")
    for scale_name, what, mine, theirs, r in data["parity"]:
        verdict = "ok" if r < PARITY_TOLERANCE else "FAIL"
        print(f"  [{scale_name}] {what}: {mine:.8g} vs {theirs:.8g}  rel {r:.1e} {verdict}")
    parity_ok = all(r[4] < PARITY_TOLERANCE for r in data["parity"])
    print(f"\nratio_opd: max over scales {scales} of {[fmt_ratio(x) for x in ratios['opd']]}; ratio_fixed: of "
          f"{[fmt_ratio(x) for x in ratios['fixed']]}; ratio_mem ({scales[-1]}, opd and fixed vs GKDTrainer): "
          f"max of {[fmt_ratio(x) for x in ratios['mem']]}")
    print(f"ratio_opd={fmt_ratio(max(ratios['opd']))} ratio_fixed={fmt_ratio(max(ratios['fixed']))} "
          f"ratio_mem={fmt_ratio(max(ratios['mem']))} parity={'ok' if parity_ok else 'fail'}", flush=True)
