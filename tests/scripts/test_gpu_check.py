"""scripts/gpu_check.py on its CPU stand-in (--smoke): the same code a GPU machine runs, at tiny shapes."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
LAST = re.compile(r"gpu_check device=cpu dtype=bfloat16 opd_s=(?P<opd>[\d.]+) opd_tok_s=\d+ opd_peak_mb=\d+ "
                  r"sft_s=(?P<sft>[\d.]+) sft_tok_s=\d+ sft_peak_mb=\d+")


def test_the_smoke_run_trains_both_cells_in_bfloat16_and_prints_the_summary_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "2", "--batch", "4", "--prompt-tokens",
                           "8", "--new-tokens", "8"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = LAST.fullmatch(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout[-2000:]
    assert float(match["opd"]) > 0 and float(match["sft"]) > 0


def test_the_real_shapes_run_through_the_same_check_with_their_own_keys():
    """--shapes smollm2: the benchmark's SmolLM2-135M-shaped pair (grouped-query heads, tied, 49,152 tokens),
    shrunk by --smoke; its keys carry its name after the default shape's."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--shapes", "qwen2.5,smollm2", "--steps", "1",
                           "--batch", "2", "--prompt-tokens", "8", "--new-tokens", "8"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert LAST.match(last), last
    assert re.search(r" smollm2_opd_s=[\d.]+ smollm2_opd_tok_s=\d+ smollm2_opd_peak_mb=\d+ smollm2_sft_s=[\d.]+", last), last


def test_an_unknown_shape_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--shapes", "llama9"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "--shapes takes names from" in proc.stderr and "Traceback" not in proc.stderr


def test_without_a_gpu_the_full_check_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "no CUDA device here" in proc.stderr and "Traceback" not in proc.stderr
