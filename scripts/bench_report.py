"""The report of scripts/bench_vs_trl.py: the table, FLOP/s fractions, loss parity and the summary line.

Kept apart from the runs so that a saved run (`--json`) can be re-printed with `--report` and so the
measurement code stays about measuring.

Every ratio is paired: in each round, kltd's run over the TRL run(s) right after it (same scale, case and
TRL setup), one ratio per round; a ratio is reported as the median over rounds with its range (min-max).
TRL runs in two settings (TRL_SETTINGS), each paired with the same kltd run: as shipped, and with kltd's
malloc setting (kltd.fast.memory), which kltd's own runs always have.
"""

from __future__ import annotations

import math
import statistics

PARITY_TOLERANCE = 1e-5

# Which TRL setups each kltd case is compared with; each round runs, per setup, kltd then TRL in every setting.
TRL_SETUPS = {
    "opd": ["distill", "distill_nogc", "gkd1", "gkd1_nogc"],
    "fixed": ["gkd0", "gkd0_nogc"],
}
# TRL's settings: name -> (run-key system, whether TRL's process gets kltd's malloc setting, label, key suffix)
TRL_SETTINGS = {
    "shipped": ("trl", False, "TRL as shipped", ""),
    "same_malloc": ("trl_same_malloc", True, "TRL with kltd's malloc setting", "_same_malloc"),
}
LABELS = {
    "kltd:opd": "kltd prefix=student trajectory=student",
    "kltd:fixed": "kltd prefix=fixed trajectory=expert",
    "distill": "TRL DistillationTrainer beta=1 (GC on, default)",
    "distill_nogc": "TRL DistillationTrainer beta=1 (GC off)",
    "gkd1": "TRL GKDTrainer lmbda=1 beta=1 (GC on, default)",
    "gkd1_nogc": "TRL GKDTrainer lmbda=1 beta=1 (GC off)",
    "gkd0": "TRL GKDTrainer lmbda=0 beta=0 (GC on, default)",
    "gkd0_nogc": "TRL GKDTrainer lmbda=0 beta=0 (GC off)",
}
SETTING_TAGS = {"shipped": "", "same_malloc": " +malloc"}


def run_key(scale: str, setting: str, setup: str) -> str:
    return f"{scale}|{TRL_SETTINGS[setting][0]}:{setup}"


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


def fmt_ratio(x: float | None) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.3f}"


def fmt_range(values: list[float]) -> str:
    """'median (min-max)' of per-round ratios."""
    return f"{fmt_ratio(statistics.median(values))} ({fmt_ratio(min(values))}-{fmt_ratio(max(values))})"


def round_ratios(kltd_runs: list[dict], trl_runs: list[dict], setups: list[str], setup: str) -> list[float]:
    """One ratio per round: the kltd run's median step over its paired TRL run's median step.

    A TRL run records the kltd run it is paired with (`paired_kltd`, its median s/step). Older saves lack
    it: there round r ran kltd, setups[0], kltd, setups[1], ..., so the kltd run paired with `setup` in
    round r is kltd_runs[r * len(setups) + setups.index(setup)]."""
    j, n = setups.index(setup), len(setups)
    out = []
    for r, t in enumerate(trl_runs):
        k = t["paired_kltd"] if "paired_kltd" in t else statistics.median(kltd_runs[r * n + j]["times"])
        out.append(k / statistics.median(t["times"]))
    return out


def settings_in(data: dict) -> list[str]:
    """The TRL settings a save holds runs for. A save from before both settings ran in one invocation has
    `trl` runs only: those were with kltd's malloc setting when it was run with --trl-keep-freed-memory."""
    runs = data["runs"]
    present = [s for s in TRL_SETTINGS if any(k.split("|", 1)[1].startswith(TRL_SETTINGS[s][0] + ":") for k in runs)]
    if present == ["shipped"] and data.get("args", {}).get("trl_keep_freed_memory"):
        data["runs"] = {k.replace("|trl:", "|trl_same_malloc:"): v for k, v in runs.items()}
        return ["same_malloc"]
    return present


def load_line(data: dict) -> str:
    loads = data.get("loadavg") or []
    shown = [" ".join(f"{x:.2f}" for x in load) for load in loads[:1] + loads[1:][-1:]]
    where = ", ".join(f"{when} {value}" for when, value in zip(("before", "after"), shown))
    return (f"load average (1, 5, 15 min): {where or 'not recorded'}; {data.get('cpu_count', '?')} CPUs "
            "(other work on the machine slows every run, multi-threaded ones unevenly)")


def report(data: dict) -> None:
    """Print the table, the FLOP/s fractions, parity and the final line from the collected runs."""
    settings = settings_in(data)
    runs, scales = data["runs"], [s["name"] for s in data["scales"]]
    summary = {key: summarize(value) for key, value in runs.items()}
    peak_rate = max(data["gflops"]) * 1e9
    # ratios[setting][case][scale] = per-round ratios against the fastest TRL setup in that setting
    ratios: dict[str, dict[str, dict[str, list[float]]]] = {s: {c: {} for c in TRL_SETUPS} for s in settings}
    fastest: dict[tuple[str, str, str], str] = {}
    mem: dict[str, list[float]] = {s: [] for s in settings}
    print(f"\n{load_line(data)}")
    if data.get("args", {}).get("quick"):
        print("note: --quick runs everything in one process, where kltd's malloc setting, once applied, holds for "
              "every later run; its two TRL settings are not told apart (a smoke test of the output, not a figure)")
    print(f"fp32 matmul rate: {max(data['gflops']):.1f} GFLOP/s (best of start/end: "
          f"{', '.join(f'{g:.1f}' for g in data['gflops'])})")
    print("s/step: median over runs of each run's median step; kltd/this: ratio of those medians; paired: median "
          "(min-max) over rounds of (kltd run / this setup's TRL run after it in the same round); "
          "+malloc: TRL given kltd's malloc setting")
    print(f"\n{'scale':<5} {'setup':<58} {'s/step':>8} {'(min-max over runs)':>19} {'tok/step':>8} "
          f"{'tok/s':>7} {'peak MB':>8} {'kltd/this':>9} {'paired (min-max)':>21} {'mem k/this':>10}")
    for scale in scales:
        for case, setups in TRL_SETUPS.items():
            # the setups this invocation ran (bench_vs_trl --trl-setups may pick some)
            setups = [x for x in setups if any(run_key(scale, setting, x) in runs for setting in settings)]
            k_runs = runs[f"{scale}|kltd:{case}"]
            k = summary[f"{scale}|kltd:{case}"]
            rows = [(LABELS[f"kltd:{case}"], k, None)]
            for setting in settings:
                for setup in setups:
                    key = run_key(scale, setting, setup)
                    rows.append((LABELS[setup] + SETTING_TAGS[setting], summary[key],
                                 round_ratios(k_runs, runs[key], setups, setup)))
            for label, s, paired in rows:
                mem_ratio = k["peak_mb"] / s["peak_mb"] if s["peak_mb"] > 0 else float("nan")
                theirs = paired is not None
                print(f"{scale:<5} {label:<58} {s['s_step']:8.3f} "
                      f"{'(' + format(s['s_min'], '.3f') + '-' + format(s['s_max'], '.3f') + ')':>19} "
                      f"{s['trained_tokens']:8.0f} {s['tok_s']:7.0f} {s['peak_mb']:8.0f} "
                      f"{format(k['s_step'] / s['s_step'], '.3f') if theirs else '':>9} "
                      f"{fmt_range(paired) if theirs else '':>21} "
                      f"{format(mem_ratio, '.3f') if theirs else '':>10}")
            for setting in settings:
                best = min(setups, key=lambda x, setting=setting: summary[run_key(scale, setting, x)]["s_step"])
                fastest[setting, case, scale] = best
                ratios[setting][case][scale] = round_ratios(k_runs, runs[run_key(scale, setting, best)], setups, best)
        if scale == scales[-1]:  # memory: against GKDTrainer (lower of its two settings) at the largest scale
            for setting in settings:
                for case, setups in TRL_SETUPS.items():
                    lowest = min(summary[run_key(scale, setting, s)]["peak_mb"] for s in setups
                                 if s.startswith("gkd") and run_key(scale, setting, s) in summary)
                    mem[setting].append(summary[f"{scale}|kltd:{case}"]["peak_mb"] / max(lowest, 1e-9))
        for key in ("kltd:fixed", *(run_key(scale, st, s).split("|", 1)[1] for st in settings
                                    for s in ("gkd0", "gkd0_nogc") if run_key(scale, st, s) in summary)):
            s = summary[f"{scale}|{key}"]
            rate = model_flops_per_step(s) / s["s_step"]
            print(f"{scale:<5} fixed-prefix model FLOP/s, {key}: {rate / 1e9:.2f} GFLOP/s = "
                  f"{rate / peak_rate:.1%} of the matmul rate")

    print("\nloss parity (same batch, same logits; relative difference, tolerance 1e-5):")
    for scale_name, what, mine, theirs, r in data["parity"]:
        verdict = "ok" if r < PARITY_TOLERANCE else "FAIL"
        print(f"  [{scale_name}] {what}: {mine:.8g} vs {theirs:.8g}  rel {r:.1e} {verdict}")
    parity_ok = all(r[4] < PARITY_TOLERANCE for r in data["parity"])

    rounds = max(len(v) for by_case in ratios.values() for by_scale in by_case.values() for v in by_scale.values())
    print(f"\nratios, kltd / the fastest TRL setup: median (min-max) over {rounds} round(s), each round's ratio paired")
    print((f"{'scale':<5} {'case':<6} " + "".join(f"{TRL_SETTINGS[s][2]:<40}" for s in settings)).rstrip())
    for scale in scales:
        for case in TRL_SETUPS:
            cells = [f"{fmt_range(ratios[s][case][scale])} vs {fastest[s, case, scale]}" for s in settings]
            print((f"{scale:<5} {case:<6} " + "".join(f"{c:<40}" for c in cells)).rstrip())
    for setting in settings:
        print(f"ratio_mem, {TRL_SETTINGS[setting][2]} ({scales[-1]}, opd and fixed vs GKDTrainer): "
              f"max of {[fmt_ratio(x) for x in mem[setting]]}")

    def worst(setting: str, case: str) -> float:
        return max(statistics.median(v) for v in ratios[setting][case].values())

    fields = []
    for setting in settings:
        suffix = TRL_SETTINGS[setting][3]
        fields += [f"ratio_opd{suffix}={fmt_ratio(worst(setting, 'opd'))}",
                   f"ratio_fixed{suffix}={fmt_ratio(worst(setting, 'fixed'))}",
                   f"ratio_mem{suffix}={fmt_ratio(max(mem[setting]))}"]
        if setting == "shipped":
            fields.append(f"parity={'ok' if parity_ok else 'fail'}")
    if "shipped" not in settings:
        fields.append(f"parity={'ok' if parity_ok else 'fail'}")
    for scale in scales:
        for setting in settings:
            suffix = TRL_SETTINGS[setting][3]
            fields += [f"ratio_{case}{suffix}_{scale}={fmt_ratio(statistics.median(ratios[setting][case][scale]))}"
                       for case in TRL_SETUPS]
    print(" ".join(fields), flush=True)
