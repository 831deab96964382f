"""Seconds and peak memory by phase (kltd.train.phases): a phase's own peak, nested phases, and the record a run
keeps."""

import json
import time

from kltd.train.phases import MB, Phases


def resident_block(phases: Phases, size: int) -> bytearray:
    """`size` bytes, touched (resident), held until the phase's sampler has read an RSS that holds them (a hang
    guard only: on any machine the sampler reads within a few of its 10 ms intervals)."""
    before = phases._sampler.largest
    block = bytearray(size)
    for i in range(0, len(block), 4096):
        block[i] = 1
    limit = time.monotonic() + 60
    while phases._sampler.largest < before + size // 2 and time.monotonic() < limit:
        time.sleep(0.01)
    return block


def test_a_phase_records_its_own_peak_not_the_process_so_far():
    phases = Phases()
    assert phases.per_phase  # Linux: /proc/self/statm
    with phases("big"):
        block = resident_block(phases, 200 * MB)
        del block  # freed before the phase ends: only the sampler saw it
    with phases("small"):
        pass
    big, small = phases.peaks["big"]["cpu_rss"], phases.peaks["small"]["cpu_rss"]
    assert big >= small + 100 * MB and phases._sampler is None  # no thread once no phase is open
    assert set(phases.seconds) == {"big", "small"} and phases.memory()["cpu_rss"] in ("per phase",
                                                                                       "since the process started")


def test_a_nested_phase_counts_for_the_phase_around_it():
    phases = Phases()
    with phases("training", timed=False):
        with phases("evaluation"):
            block = resident_block(phases, 120 * MB)
            del block
    assert phases.peaks["training"]["cpu_rss"] >= phases.peaks["evaluation"]["cpu_rss"]
    assert "training" not in phases.seconds and "evaluation" in phases.seconds  # untimed: counted elsewhere


def test_a_run_records_the_peak_memory_of_each_phase(tmp_path):
    from kltd.train.job import train_job
    from tests.train.test_job import tiny_config

    summary = train_job(tiny_config(), tmp_path / "run")
    memory = json.loads((tmp_path / "run" / "metrics.json").read_text())["memory"]
    assert memory == summary["memory"]
    assert {"data", "loading", "evaluation", "training"} <= set(memory["peak_mb"])
    assert all(0 < figures["cpu_rss"] < 64 * 1024 for figures in memory["peak_mb"].values())
