"""Write the Markov task's teacher, student initialisation and tokenizer in Hugging Face format.

    python scripts/make_markov_task.py            # writes kltd/assets/markov/{teacher,student,task.json}
    python scripts/make_markov_task.py --check    # rebuild into a temp dir; compare weight sha256s
    python scripts/make_markov_task.py --out DIR --n-states 8 --branching 2 --horizon 7 --width 8 --layers 1

The teacher is the chain itself written as a one-layer Llama (kltd.data.markov_models: exact, no training);
the student is a seeded random Llama of `--width` hidden dimensions, below the rank of the teacher's
log-table (recorded in task.json), so it cannot represent the teacher. Each model directory holds the
tokenizer too, so `AutoModelForCausalLM` and `AutoTokenizer` load either offline. The student's warm-up
(`--warm-steps` of cross-entropy) runs on one thread with deterministic algorithms and torch's AVX2 kernels
(set below unless the environment names others), so the same arguments give the same weights bit for bit on
any x86-64 CPU with AVX2: vectorised math differs in its last bits between kernel sets (AVX-512's among them),
and 400 steps carry that into other weights (a student 0.23 away in its largest entry, its reverse KL 37.4
nats, not 32.3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# The kernel sets the shipped pair was built with (see the docstring), read when torch loads: set only before it
# (imported where torch already runs, this module leaves the environment, and so every later subprocess, alone).
if "torch" not in sys.modules:
    for _variable, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
                              ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        os.environ.setdefault(_variable, _value)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kltd.data.markov import EOS_ID, MarkovSettings, build_tokenizer, make_chain  # noqa: E402
from kltd.data.markov_models import student_model, teacher_model, warm_up  # noqa: E402
from kltd.rollout.exact_kl import exact_sequence_figures  # noqa: E402
from kltd.data.toy_tokenizer import save_tokenizer  # noqa: E402

ASSETS = REPO / "kltd" / "assets" / "markov"
WEIGHT_FILES = ("model.safetensors",)


@dataclass(frozen=True)
class StudentSettings:
    width: int = 2  # hidden dimensions: the capacity gap (logits span at most this many dimensions)
    layers: int = 2
    heads: int = 1  # width must be a multiple of 2 * heads
    init_seed: int = 1  # the student's random initialisation
    warm_steps: int = 400  # light pre-training on walks of the chain (kltd.data.markov_models.warm_up); 0: random
    warm_lr: float = 3e-3


def logit_rank(chain) -> int:
    """The rank of the states' log-table rows once each row's mean is removed (softmax ignores a constant per
    row): a student needs at least this many hidden dimensions to write the teacher's logits exactly."""
    table = torch.tensor(chain.log_table(), dtype=torch.float64)[chain.state_ids]
    return int(torch.linalg.matrix_rank(table - table.mean(-1, keepdim=True)))


def exact_against_teacher(model, teacher, chain) -> dict:
    """The exact figures with `model` in the student's place, averaged over the start states (one prompt each,
    `MarkovChain.start_ids`: the prompts data=markov draws)."""
    support = torch.tensor(chain.support())
    per_start = [exact_sequence_figures(model, teacher, [start], horizon=chain.settings.horizon, eos_id=EOS_ID,
                                        support=support) for start in chain.start_ids]
    keys = ("forward_kl", "reverse_kl", "student_accepted", "student_entropy", "student_length", "teacher_entropy",
            "teacher_entropy_rate", "teacher_length", "teacher_ends")
    return {key: sum(getattr(f, key) for f in per_start) / len(per_start) for key in keys}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out_dir: Path, task: MarkovSettings, student: StudentSettings) -> dict:
    torch.set_num_threads(1)
    chain = make_chain(task)
    tokenizer = build_tokenizer(task.n_states)
    models = {"teacher": teacher_model(chain),
              "student": student_model(chain.vocab_size, student.width, student.layers, student.init_seed, student.heads)}
    if student.warm_steps:
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)  # with one thread: the same weights on a rerun on this kind of CPU
        warm_up(models["student"], chain, student.warm_steps, lr=student.warm_lr, seed=student.init_seed)
        torch.use_deterministic_algorithms(before)
    report = {"task": task.as_dict(), "student": asdict(student), "vocab_size": chain.vocab_size,
              "teacher_logit_rank": logit_rank(chain),
              "chain": {tokenizer.convert_ids_to_tokens(s): {tokenizer.convert_ids_to_tokens(t): p
                                                             for t, p in sorted(chain.row(s).items())}
                        for s in chain.state_ids},
              "torch": torch.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "models": {}}
    for role, model in models.items():
        target = out_dir / role
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target, safe_serialization=True)
        save_tokenizer(tokenizer, target)
        report["models"][role] = {"exact": exact_against_teacher(model, models["teacher"], chain),
                                  "parameters": sum(p.numel() for p in model.parameters()),
                                  "weights_sha256": {name: file_sha256(target / name) for name in WEIGHT_FILES}}
    (out_dir / "task.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS, help="output directory (default: the package assets)")
    parser.add_argument("--check", action="store_true",
                        help="rebuild into a temporary directory and compare weight sha256s with --out's")
    defaults_task, defaults_student = MarkovSettings(), StudentSettings()
    assert not set(asdict(defaults_task)) & set(asdict(defaults_student)), "one flag per setting"
    for name, value in {**asdict(defaults_task), **asdict(defaults_student)}.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    task = MarkovSettings(**{k: getattr(args, k) for k in asdict(defaults_task)})
    student = StudentSettings(**{k: getattr(args, k) for k in asdict(defaults_student)})
    return args, task, student


def main(argv=None) -> int:
    args, task, student = parse(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            report = build(Path(tmp), task, student)
        ok = True
        for role, entry in report["models"].items():
            for name, digest in entry["weights_sha256"].items():
                committed = args.out / role / name
                same = committed.is_file() and file_sha256(committed) == digest
                ok &= same
                print(f"{role}/{name}: {'OK' if same else 'MISMATCH'}")
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1
    report = build(args.out, task, student)
    print(f"wrote {args.out}: vocabulary {report['vocab_size']}, teacher logit rank {report['teacher_logit_rank']}, "
          f"student width {student.width}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
