"""The report of scripts/bench_vs_trl.py: the table, FLOP/s fractions, loss parity and the summary line.

Kept apart from the runs so that a saved run (`--json`) can be re-printed with `--report` and so the
measurement code stays about measuring.

Every ratio is paired: in each round, kltd's run over the TRL run(s) right after it (same scale, case and
TRL setup), one ratio per round; a ratio is reported as the median over rounds with its range (min-max).
TRL runs in two settings (TRL_SETTINGS), each paired with the same kltd run: as shipped, and with kltd's
malloc setting (kltd.fast.memory), which kltd's own runs always have.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from tests.support.tolerances import U, divergence_bound, llama_chain, two_orders  # needs the repository on the path


def parity_tolerance(vocab: int, tokens: int, loss: float, chain: int = 0) -> float:
    """The most kltd's and TRL's float32 values of one loss can differ, relative to the loss: the mean over at most
    `tokens` supervised positions of a divergence summed over a `vocab`-token vocabulary (scripts/bench_parity.py's
    losses: jsd(beta) and the KLs, at temperature 1), from the logits of two models whose forward chains are
    `chain` roundings long together (tests/support/tolerances.py: llama_chain; 0 where both sides get the same
    logits). Each side is within float32's bound of the exact value:
    - the divergence (tests/support/tolerances.py: divergence_bound, first order): per position, the two
      log-softmax normalisers' sums of V terms, the terms' roundings, and the sum over the vocabulary of terms
      whose absolute values add up to at most D + 2 (D: the position's divergence; sum_v a_v |la_v - lb_v| <=
      KL + 2 TV), for logits of O(1) size (tolerances.forward_bound's convention); over the positions the
      magnitudes add up to tokens x (loss + 2). A sum over the positions' terms is counted as V + tokens
      roundings long: kltd sums each position over the vocabulary, then the positions; TRL sums all
      positions' terms in one reduction, which torch blocks (a cascade of partial sums on the CPU) so that no
      term goes through more additions than that. The mean divides by the count (one rounding of the loss).
    - the models' forwards on the two sides' paths (packed rows, a fused or chunked output layer): each logit
      within two_orders(chain, 1) of the other side's, which moves each model's log-probabilities, and so a
      KL or jsd, by at most twice that (the divergence's gradient in the logits has absolute values adding up to
      at most 2 TV <= 2).
    What it can tell apart (--quick's pairs, losses 0.3 for the KLs and 0.07 for jsd(0.5)): at V = 17 (toy) it is
    1e-4 for the same logits and 3e-3 through the models, far below the 3-6% between forward and reverse KL there
    and the 77% between jsd(0.5) and a KL; at V = 2,000 and 32,000 it is 0.5% and 8% (20% and 32% for jsd(0.5),
    whose loss is smaller): float32's worst case for a sum of V terms is gamma(V) of their size (2e-3 at 32,000),
    which still tells jsd(0.5) from a KL but not forward from reverse KL on the random pairs (0.02-0.4% apart:
    that check is the toy scale's)."""
    total = divergence_bound(vocab, 1.0, tokens * (loss + 2), tokens=tokens, terms=vocab + tokens)
    one_side = total / tokens + U * loss
    return (2 * one_side + 4 * two_orders(chain, 1.0)) / max(loss, 1e-30)


def parity_sizes(scale: dict) -> tuple[int, int, int] | None:
    """(vocabulary, supervised tokens at most, the two models' forward chains) of a benchmark scale, from its
    models' config.json and its batch size x new tokens; None where the models are gone (a saved run re-printed
    after its temporary models were removed) or the scale does not say."""
    try:
        configs = [json.loads((Path(scale[role]) / "config.json").read_text()) for role in ("student", "teacher")]
        tokens = scale["batch_size"] * scale["max_new_tokens"]
    except (KeyError, OSError, ValueError):
        return None
    return configs[0]["vocab_size"], tokens, sum(llama_chain(c) for c in configs)


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
    mem_by_scale: dict[str, float] = {}  # kltd / TRL's lowest peak of the same case, the larger over the cases
    print(f"\n{load_line(data)}")
    if data.get("args", {}).get("quick"):
        print("note: --quick runs everything in one process, where kltd's malloc setting, once applied, holds for "
              "every later run; its two TRL settings are not told apart (a smoke test of the output, not a figure)")
    print(f"fp32 matmul rate: {max(data['gflops']):.1f} GFLOP/s (best of start/end: "
          f"{', '.join(f'{g:.1f}' for g in data['gflops'])})")
    print("s/step: median over runs of each run's median step; kltd/this: ratio of those medians; paired: median "
          "(min-max) over rounds of (kltd run / this setup's TRL run after it in the same round); "
          "+malloc: TRL given kltd's malloc setting")
    print(f"\n{'scale':<7} {'setup':<58} {'s/step':>8} {'(min-max over runs)':>19} {'tok/step':>8} "
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
                print(f"{scale:<7} {label:<58} {s['s_step']:8.3f} "
                      f"{'(' + format(s['s_min'], '.3f') + '-' + format(s['s_max'], '.3f') + ')':>19} "
                      f"{s['trained_tokens']:8.0f} {s['tok_s']:7.0f} {s['peak_mb']:8.0f} "
                      f"{format(k['s_step'] / s['s_step'], '.3f') if theirs else '':>9} "
                      f"{fmt_range(paired) if theirs else '':>21} "
                      f"{format(mem_ratio, '.3f') if theirs else '':>10}")
            for setting in settings:
                best = min(setups, key=lambda x, setting=setting: summary[run_key(scale, setting, x)]["s_step"])
                fastest[setting, case, scale] = best
                ratios[setting][case][scale] = round_ratios(k_runs, runs[run_key(scale, setting, best)], setups, best)
        def mem_ratio(setting: str, case: str, setups: list[str], gkd_first: bool) -> float:
            """kltd's peak over the lowest TRL setup's run in `setting` (GKDTrainer's where it ran, if gkd_first)."""
            ran = [s for s in setups if run_key(scale, setting, s) in summary]
            ran = ([s for s in ran if s.startswith("gkd")] or ran) if gkd_first else ran
            lowest = min(summary[run_key(scale, setting, s)]["peak_mb"] for s in ran)
            return summary[f"{scale}|kltd:{case}"]["peak_mb"] / max(lowest, 1e-9)

        mem_by_scale[scale] = max(mem_ratio(settings[0], case, setups, False) for case, setups in TRL_SETUPS.items())
        if scale == scales[-1]:  # memory: against GKDTrainer (its lowest setup run; else TRL's) at the last scale
            for setting in settings:
                mem[setting] += [mem_ratio(setting, case, setups, True) for case, setups in TRL_SETUPS.items()]
        for key in ("kltd:fixed", *(run_key(scale, st, s).split("|", 1)[1] for st in settings
                                    for s in ("gkd0", "gkd0_nogc") if run_key(scale, st, s) in summary)):
            s = summary[f"{scale}|{key}"]
            rate = model_flops_per_step(s) / s["s_step"]
            print(f"{scale:<7} fixed-prefix model FLOP/s, {key}: {rate / 1e9:.2f} GFLOP/s = "
                  f"{rate / peak_rate:.1%} of the matmul rate")

    print("\nloss parity (same batch; relative difference, tolerance: float32's bound at the scale's vocabulary, "
          "tokens and models, bench_report.parity_tolerance):")
    sizes = {s["name"]: parity_sizes(s) for s in data["scales"]}
    parity_ok = True
    for scale_name, what, mine, theirs, r in data["parity"]:
        known = sizes.get(scale_name)
        if known is None:  # nothing to derive a tolerance from: only an exact match passes
            tolerance, note = 0.0, " (models gone: exact match only)"
        else:  # the models' chains where a side runs the models itself (kltd's Trainer.loss)
            vocab, tokens, chain = known
            tolerance, note = parity_tolerance(vocab, tokens, abs(theirs), chain if "Trainer.loss" in what else 0), ""
        ok = r <= tolerance
        parity_ok &= ok
        print(f"  [{scale_name}] {what}: {mine:.8g} vs {theirs:.8g}  rel {r:.1e} (tolerance {tolerance:.1e}{note}) "
              f"{'ok' if ok else 'FAIL'}")

    rounds = max(len(v) for by_case in ratios.values() for by_scale in by_case.values() for v in by_scale.values())
    print(f"\nratios, kltd / the fastest TRL setup: median (min-max) over {rounds} round(s), each round's ratio paired")
    print((f"{'scale':<7} {'case':<6} " + "".join(f"{TRL_SETTINGS[s][2]:<40}" for s in settings)).rstrip())
    for scale in scales:
        for case in TRL_SETUPS:
            cells = [f"{fmt_range(ratios[s][case][scale])} vs {fastest[s, case, scale]}" for s in settings]
            print((f"{scale:<7} {case:<6} " + "".join(f"{c:<40}" for c in cells)).rstrip())
    print(f"ratio_mem_<scale>: kltd's peak over the lowest TRL setup's of the same case ({TRL_SETTINGS[settings[0]][2]}),"
          f" the larger over opd and fixed: {', '.join(f'{k} {fmt_ratio(v)}' for k, v in mem_by_scale.items())}")
    sampler = sampler_report(data.get("sampling") or {})
    for setting in settings:
        print(f"ratio_mem, {TRL_SETTINGS[setting][2]} ({scales[-1]}, opd and fixed vs GKDTrainer, or TRL's setup run "
              "where GKDTrainer did not run): "
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
    fields += [f"ratio_mem_{scale}={fmt_ratio(mem_by_scale[scale])}" for scale in scales]
    fields += [f"sampler_vs_vllm_{scale}={value}" for scale, value in sampler.items()]
    print(" ".join(fields), flush=True)


def sampler_report(sampling: dict) -> dict[str, str]:
    """Print the sampler comparison (scripts/bench_sampler.py); per scale, the summary value: the lower over the
    batch sizes of the median over rounds of (kltd's tokens/s / vLLM's in the same round); `skipped` where
    vLLM's side did not run (absent or failed, the note says which), `failed` where kltd's failed."""
    values = {}
    for scale, result in sampling.items():
        if result["kltd"] is None:  # kltd's own sampler failed: nothing to compare
            print(f"\nsampling at {scale}: {result['note']}")
            values[scale] = "failed"
            continue
        print(f"\nsampling at {scale}: tokens/s, median (min-max) over {len(result['kltd'])} round(s); the ratio is "
              "kltd's over vLLM's in the same round")
        if result["vllm"] is None:
            print(f"  {result['note']}")
        worst = None
        for rows in map(str, result["rows"]):
            mine = [r[rows]["tok_s"] for r in result["kltd"]]
            line = f"  {rows:>3} rows: kltd {fmt_range(mine)}"
            if result["vllm"] is not None:
                theirs = [r[rows]["tok_s"] for r in result["vllm"]]
                paired = [a / b for a, b in zip(mine, theirs, strict=True)]
                line += f"  vLLM {fmt_range(theirs)}  kltd/vLLM {fmt_range(paired)}"
                worst = min(worst if worst is not None else math.inf, statistics.median(paired))
            print(line)
        values[scale] = "skipped" if worst is None else fmt_ratio(worst)
    return values
