"""Your models and your data, end to end through the CLI, on local stand-ins for the real thing: tiny random
Qwen3, Qwen2 (padded embedding rows), Llama and GPT-2 models sharing a chat tokenizer, and datasets in the
GSM8K, MATH and TRL conversational schemas as JSONL, Parquet and a save_to_disk directory."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kltd.train.models import assets_dir
from tests.app.test_cli import run_audited
from tests.support.fixtures import GSM8K, conversational_dir, gsm8k_jsonl, math_parquet, strip_tokenizer, tiny_model

TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress=false", "eval.num_prompts=4",
        "eval.batch_size=4", "eval.pass_k=2", "eval.max_new_tokens=12", "sampling.max_new_tokens=12",
        "model.device=cpu", "data.eval_fraction=0.2"]


def kltd(*args, cwd, env=None, timeout=900):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kltd.app.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    models = {arch: tiny_model(arch, root / arch, seed=i) for i, arch in enumerate(("qwen3", "qwen2_padded", "llama",
                                                                                     "gpt2"))}
    data = {"gsm8k": gsm8k_jsonl(root / "gsm8k.jsonl"), "math": math_parquet(root / "math.parquet"),
            "conversational": conversational_dir(root / "conversational")}
    return root, models, data


def summaries(sweep):
    return {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def test_a_gpt2_student_runs_every_cell_of_the_matrix_on_gsm8k(local, tmp_path):
    """A non-Llama student (no fast path) through every cell: sampling, scoring, each loss, evaluation."""
    root, models, data = local
    sweep = tmp_path / "sweep"
    out = kltd("train", "sweep=matrix", f"model.teacher={models['llama']}", f"model.student={models['gpt2']}",
               "data=file", f"data.path={data['gsm8k']}", "data.fields.prompt=question", "data.fields.response=answer",
               "data.checker=gsm8k", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = summaries(sweep)
    assert set(runs) == {"SFT", "Offline RL", "BC", "SeqKD", "Teacher-prefix RKL", "DAgger", "OPD", "GKD λ=0.5",
                         "GKD-RKL λ=0.5"}
    for method, summary in runs.items():
        assert summary["status"] == "completed", method
        assert 0 <= summary["eval_after"]["accuracy"] <= 1 and summary["eval_after"]["reverse_kl_student_states"] >= 0
        assert summary["data"]["checker"] == "gsm8k" and summary["data"]["end_token"] == "<|im_end|>"
    run_dir = next(p.parent for p in sweep.glob("*/metrics.json"))
    first = (run_dir / "first_example.txt").read_text()
    assert "<|im_start|>user\n" in first and first.rstrip().endswith("<|im_end|>")
    held_out = json.loads((run_dir / "data_split.json").read_text())["held_out_rows"]
    assert len(held_out) == 5  # 20% of 24 rows, rounded up, recorded in the run


def test_a_qwen2_teacher_with_padded_embeddings_teaches_a_qwen3_student_on_math(local, tmp_path):
    root, models, data = local
    sweep = tmp_path / "sweep"
    out = kltd("train", "-m", "prefix=fixed,student", "trajectory=expert,student", f"model.teacher={models['qwen2_padded']}",
               f"model.student={models['qwen3']}", "data=file", f"data.path={data['math']}",
               "data.fields.prompt=problem", "data.fields.response=solution", "data.checker=boxed", *TINY,
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = summaries(sweep)
    assert set(runs) == {"SFT", "Offline RL", "DAgger", "OPD"}
    assert all(r["status"] == "completed" and "accuracy" in r["eval_after"] for r in runs.values())


def test_make_data_on_a_conversational_dataset_then_offline_rl_on_what_it_wrote(local, tmp_path):
    root, models, data = local
    out_file = tmp_path / "sampled.jsonl"
    out = kltd("make-data", f"out={out_file}", "n=12", f"model.teacher={models['llama']}",
               f"model.student={models['qwen3']}", "data=file", f"data.path={data['conversational']}",
               "data.eval_split=test", "data.checker=gsm8k", "sampling.max_new_tokens=12", "model.device=cpu",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 12 and isinstance(rows[0]["prompt"], list) and rows[0]["completion"][0]["role"] == "assistant"
    assert "####" in rows[0]["answer"]  # the reference travels with the sampled completion
    run_dir = tmp_path / "offline-rl"
    out = kltd("train", "method=filtered_bc", f"model.teacher={models['llama']}", f"model.student={models['qwen3']}",
               "data=file", f"data.path={out_file}", "data.checker=gsm8k", *TINY, f"hydra.run.dir={run_dir}",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["method"] == "Offline RL (reward-weighted)" and summary["status"] == "completed"


def one_line(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[0]


def test_a_real_tokenizer_mismatch_is_refused_before_training(local, tmp_path):
    root, models, data = local
    out = kltd("train", "model.teacher=toy/teacher", f"model.student={models['qwen3']}", "data=file",
               f"data.path={data['gsm8k']}", "data.fields.prompt=question", "data.fields.response=answer", *TINY,
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "different tokenizers" in one_line(out)


@pytest.mark.parametrize("args,words", [
    (["data=addition", "model.student=Qwen/Qwen3-0.6B"], "not a local directory nor in the Hugging Face cache"),
    (["data=hub", "data.path=kltd-tests/no-such-dataset"], "kltd-tests/no-such-dataset"),
])
def test_hub_names_fail_fast_when_offline(tmp_path, args, words):
    """Fast means without waiting on the network, whatever the machine's load: the process never tries to reach
    it (no name lookup, no connection) and never sleeps (no retry's back-off); and no model is loaded."""
    out, seen = run_audited("train", *args, *TINY, cwd=tmp_path, watch=[assets_dir()],
                            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert seen == {"opened": [], "network": [], "slept": []}, seen
    assert words in one_line(out)


def test_bad_data_are_refused_before_any_model_loads_or_directory_is_written(local, tmp_path):
    """The student's weights are corrupt too: the data error comes first, and nothing is written."""
    root, models, data = local
    student = Path(shutil.copytree(models["qwen3"], tmp_path / "student"))
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "" if i == 2 else f"q{i}", "completion": "a"}) + "\n"
                            for i in range(10)))
    run_dir = tmp_path / "run"
    out = kltd("train", f"model.teacher={models['llama']}", f"model.student={student}", "data=file",
               f"data.path={rows}", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert one_line(out).startswith(f"kltd: error: {rows}:3: empty prompt; ")
    assert "data.bad_rows=drop" in out.stderr and not run_dir.exists()


def test_answers_the_checker_cannot_read_are_dropped_and_counted(local, tmp_path):
    """Competition math under the GSM8K checker: most answers are expressions with no number in them."""
    root, models, data = local
    rows = [{"question": q, "answer": a} for q, a in GSM8K * 3]
    rows += [{"question": f"Simplify expression {i}.", "answer": "So it is $\\boxed{x+y}$."} for i in range(30)]
    path = tmp_path / "competition.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", f"model.teacher={models['llama']}", f"model.student={models['qwen3']}", "data=file",
            f"data.path={path}", "data.fields.prompt=question", "data.fields.response=answer", "data.checker=gsm8k",
            *TINY]
    refused = one_line(kltd(*args, f"hydra.run.dir={tmp_path / 'refused'}", cwd=tmp_path))
    line = re.search(rf"{re.escape(str(path))}:(\d+): no number in the answer", refused)
    assert line and int(line.group(1)) > 18 and "try data.checker=boxed or data.checker=exact" in refused
    run_dir = tmp_path / "run"
    out = kltd(*args, "data.bad_rows=drop", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "; 30 bad rows dropped (no number in the answer: 30)" in out.stdout
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["data"]["bad_rows_dropped"] == {"no number in the answer": 30}
    assert summary["data"]["train_examples"] + summary["data"]["eval_examples"] == 18


@pytest.mark.parametrize("without,template", [
    (("pad_token",), False),  # GPT-2 style: pad is the end-of-sequence token, which also ends every response
    (("pad_token", "eos_token"), True),  # neither: the template's end of turn pads and ends responses
])
def test_a_tokenizer_without_a_pad_token_trains_end_to_end(local, tmp_path, without, template):
    root, models, data = local
    pair = {role: strip_tokenizer(shutil.copytree(models[arch], tmp_path / role), *without, template=template)
            for role, arch in (("teacher", "llama"), ("student", "qwen3"))}
    sweep = tmp_path / "sweep"
    out = kltd("train", "-m", "prefix=fixed,student", "trajectory=student", f"model.teacher={pair['teacher']}",
               f"model.student={pair['student']}", "data=file", f"data.path={data['conversational']}",
               "data.eval_split=test", "data.checker=gsm8k", *TINY, f"hydra.sweep.dir={sweep}",
               "hydra/launcher=basic", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = summaries(sweep)
    assert len(runs) == 2 and all(r["status"] == "completed" for r in runs.values())
    note = "data: the student's tokenizer has no chat template; messages are joined as plain text"
    assert (note in out.stdout) == (not template)


@pytest.mark.parametrize("case", ["prompt_completion_no_pad", "named_columns_checker_none", "messages"])
def test_a_run_without_an_answer_checker_finishes_with_its_checkpoint(local, tmp_path, case):
    """The README's first own-data example: no checker, so no accuracy; the run completes and says what it has."""
    root, models, data = local
    teacher, student = models["llama"], models["qwen3"]
    if case == "prompt_completion_no_pad":
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in GSM8K * 3))
        student = strip_tokenizer(shutil.copytree(student, tmp_path / "student"), "pad_token", template=True)
        teacher = strip_tokenizer(shutil.copytree(teacher, tmp_path / "teacher"), "pad_token", template=True)
        extra = [f"data.path={path}"]
    elif case == "named_columns_checker_none":
        extra = [f"data.path={data['gsm8k']}", "data.fields.prompt=question", "data.fields.response=answer",
                 "data.checker=none"]
    else:
        extra = [f"data.path={data['conversational']}", "data.eval_split=test"]
    run = tmp_path / "run"
    out = kltd("train", f"model.teacher={teacher}", f"model.student={student}", "data=file", *extra, *TINY,
               f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "completed" and summary["data"]["checker"] == "none"
    assert "accuracy" not in summary["eval_after"] and "pass_at_k" not in summary["eval_after"]
    assert (run / "checkpoint" / "model.safetensors").is_file()
    assert "reverse_kl_student_states" in out.stdout and "accuracy" not in out.stdout.split("held-out evaluation")[1]
    # its own pair with the toy preset: the one toy-tuned setting TINY does not give is named, once it runs
    assert "note: model.teacher/model.student are not the toy pair, but trainer.lr=0.001 is the toy pair's " \
           "default" in out.stdout
