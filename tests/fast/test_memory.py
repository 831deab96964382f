"""kltd.fast.memory: with freed memory kept for reuse, training steps stop re-faulting the same pages."""

import subprocess
import sys
from pathlib import Path

import pytest

# three OPD steps on the shipped toy pair after two warm-up steps; prints the minor page faults they took
PROBE = """
import resource, sys, torch
from pathlib import Path
import kltd
from kltd.fast.memory import keep_freed_memory
from kltd.schema.config import Config
from kltd.train.models import load_pair
from kltd.data.addition import make_splits
from kltd.train.trainer import Trainer
torch.set_num_threads(1)
toy = Path(kltd.__file__).parent / "assets" / "toy"
cfg = Config()
cfg.model.teacher, cfg.model.student = str(toy / "teacher"), str(toy / "student")
cfg.cache.teacher, cfg.prefix.source, cfg.trajectory.supervisor = "off", "student", "student"
cfg.sampling.max_new_tokens = 48
cfg.trainer.keep_freed_memory = sys.argv[1] == "kept"
if cfg.trainer.keep_freed_memory:
    assert keep_freed_memory() and keep_freed_memory()  # applies once, then reports it is in place
pair = load_pair(cfg.model.teacher, cfg.model.student, device="cpu")
trainer = Trainer(cfg, pair, make_splits(0, 256, 0)[0])
for _ in range(2):
    trainer.step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    trainer.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_training_steps_fault_far_fewer_pages_with_freed_memory_kept():
    kept, returned = page_faults("kept"), page_faults("returned")
    # counts of first touches of pages by the same three steps, not timings: the allocator's doing, whatever the
    # load (measured here: about 600-800 against 7,000-11,000, also with two CPU burners running)
    assert kept * 4 < returned, (kept, returned)
