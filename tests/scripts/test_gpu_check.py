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


def test_without_a_gpu_the_full_check_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "no CUDA device here" in proc.stderr and "Traceback" not in proc.stderr
