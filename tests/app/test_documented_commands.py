"""Every `kltd` command that README.md and docs/*.md show runs as typed, with small step counts and local
fixtures in place of hub names; a command that needs a GPU cluster, SLURM or the network is refused in one line
instead, before anything starts.

A command is a line of a fenced code block that runs `kltd` (continuation lines joined, the comment after `#`
dropped; in a Quickstart line the `kltd` part after `&&`), or an inline code span that runs `kltd` with at least
one argument (a bare `kltd train` in prose names the command). COMMANDS says how the test runs each one, and
`test_every_documented_command_is_covered` fails when the docs show a command that COMMANDS lacks, or COMMANDS
keeps one the docs no longer show.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# small budgets appended to every command that trains (a later key=value wins in Hydra)
TINY = ("trainer.max_steps=1", "trainer.batch_size=4", "eval.num_prompts=2", "eval.batch_size=2", "eval.pass_k=1",
        "data.n_train=16", "data.n_eval=4")


def _command(text: str) -> str | None:
    """The kltd command in a shell line, normalised; None if the line runs no kltd command."""
    text = re.sub(r"\s+#.*$", "", text).strip()
    for part in reversed(text.split("&&")):
        part = part.strip()
        match = re.match(r"^(?:\S*/)?kltd(\s.*)?$", part)
        if match:
            return "kltd" + re.sub(r"\s+", " ", match.group(1) or "").rstrip()
    return None


def documented_commands() -> dict[str, str]:
    """command -> where it is shown first (file:line)."""
    found: dict[str, str] = {}
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
            start = text[: block.start(1)].count("\n") + 1
            joined = block.group(1).replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines()):
                command = _command(line)
                if command and command != "kltd":
                    found.setdefault(command, f"{doc.name}:{start + offset}")
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for span in re.finditer(r"`((?:\S*/)?kltd [^`]+)`", prose):
            command = _command(span.group(1))
            if command and len(command.split()) > 2:
                found.setdefault(command, f"{doc.name}:{text[: text.find(span.group(0))].count(chr(10)) + 1}")
    return found


@dataclass
class Case:
    """How the test runs one documented command."""

    replace: dict = field(default_factory=dict)  # documented text -> what the test types (a fixture, a real path)
    tiny: bool = True  # append TINY
    after: tuple = ()  # appended after TINY (a later key=value wins): what a command needs besides a tiny budget
    refused: str | None = None  # the one line it must be refused with (a regular expression)
    needs: tuple = ()  # workspace files made first: see _prepare


SLURM = "hydra/launcher=slurm needs SLURM"
# the benchmark sets read from the fixtures in each set's own schema (tests/fixtures/eval_sets/) in place of the hub
LOCAL_SETS = " ".join(f"eval_sets.{name}.source=file eval_sets.{name}.path={ROOT}/tests/fixtures/eval_sets/{name}.jsonl"
                      for name in ("gsm8k", "math500", "aime24", "amc23"))
OFFLINE = r"(not in the local cache|cannot be loaded|not a local directory|offline)"

COMMANDS: dict[str, Case] = {
    "kltd train": Case(),
    "kltd train prefix=student trajectory=expert": Case(),
    "kltd train prefix=student trajectory=student": Case(),
    "kltd train -m prefix=fixed,student trajectory=expert,student": Case(),
    "kltd train method=minillm": Case(),
    "kltd train sweep=matrix": Case(),
    "kltd train divergence=kl_mix prefix=student": Case(),
    "kltd train loss.divergence=jsd loss.beta=0.1 prefix=mixed": Case(),
    "kltd train divergence=kl_mix prefix=student loss.mix=0.1 loss.mix_schedule=cosine loss.mix_end=0.9": Case(),
    # the gate decides at evaluations during training: three steps, one evaluation between
    "kltd train prefix=student trajectory=student sampling.length_schedule=entropy_gated "
    "'sampling.lengths=[3,5,7]' sampling.entropy_min=0.1 eval.every=50":
        Case(after=("trainer.max_steps=3", "eval.every=1")),
    "kltd train trainer.max_steps=50 seed=3 wandb.mode=disabled": Case(),
    "kltd train data=markov prefix=student trajectory=student": Case(),
    "kltd train data=addition": Case(),
    "kltd train --help": Case(tiny=False),
    "kltd eval --help": Case(tiny=False),
    "kltd compare outputs/multirun/<sweep>": Case(replace={"outputs/multirun/<sweep>": "{sweep}"}, tiny=False,
                                                  needs=("sweep",)),
    "kltd compare outputs/multirun/<sweep> --at flops": Case(replace={"outputs/multirun/<sweep>": "{sweep}"},
                                                             tiny=False, needs=("sweep",)),
    "kltd make-data out=student.jsonl n=5000": Case(replace={"n=5000": "n=32"}, tiny=False),
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student eval.num_prompts=500 "
    "data.max_prompt_tokens=512": Case(refused=OFFLINE),
    "kltd train data=file data.path=train.jsonl": Case(needs=("train.jsonl",)),
    "kltd train data=file data.path=gsm8k.parquet data.fields.prompt=question data.fields.response=answer "
    "data.checker=gsm8k": Case(needs=("gsm8k.parquet",)),
    "kltd train data=hub data.path=openai/gsm8k data.name=main data.fields.prompt=question "
    "data.fields.response=answer data.checker=gsm8k data.eval_split=test": Case(refused=OFFLINE),
    "kltd make-data out=teacher.jsonl writer=teacher data=file data.path=train.jsonl":
        Case(replace={"out=teacher.jsonl": "out=teacher.jsonl n=32"}, tiny=False, needs=("train.jsonl",)),
    "kltd train data=file data.path=teacher.jsonl data.checker=gsm8k method=filtered_bc": Case(needs=("teacher.jsonl",)),
    "kltd train prefix=student trajectory=student distributed.nproc_per_node=4": Case(),
    "kltd train prefix=student trajectory=student distributed.nproc_per_node=2 model.device=cpu": Case(),
    "kltd train -m prefix=fixed,student trajectory=expert distributed.nproc_per_node=2": Case(),
    "kltd train prefix=student trajectory=student distributed.nproc_per_node=4 distributed.strategy=fsdp": Case(),
    # several machines: node01 is not a host here (a batch of 32 rows divides over the 2 x 8 processes)
    **{"kltd train prefix=student trajectory=student distributed.nproc_per_node=8 distributed.nnodes=2 "
       f"distributed.node_rank={rank} distributed.rdzv_endpoint=node01:29500 hydra.run.dir=runs/opd":
       Case(after=("trainer.batch_size=32",), refused=r"cannot resolve the host 'node01'") for rank in (0, 1)},
    "kltd train prefix=student trajectory=student model=qwen3_8b_to_0_6b data=gsm8k sampling.backend=vllm":
        Case(refused=OFFLINE),
    "kltd train prefix=student trajectory=student sampling.backend=vllm sampling.vllm_sync_every=4":
        Case(refused=r"sampling\.backend=vllm"),
    # the server runs until stopped: the test asks for its help; the run trains against one it started (_prepare)
    "kltd serve-teacher markov/teacher --port 8765": Case(replace={"--port 8765": "--help"}, tiny=False),
    "kltd train prefix=student trajectory=student model.teacher_server=http://127.0.0.1:8765 model.teacher_top_k=8":
        Case(replace={"http://127.0.0.1:8765": "{teacher_server}"}, needs=("teacher_server",)),
    # against a stand-in for vLLM's server in vLLM's format (tests/train/test_openai_teacher.py runs a real one)
    "kltd train prefix=student trajectory=student model.teacher_server=http://127.0.0.1:8000/v1 model.teacher_top_k=8":
        Case(replace={"http://127.0.0.1:8000/v1": "{openai_server}"}, needs=("openai_server",)),
    "kltd train sweep=matrix hydra/launcher=basic": Case(),
    "kltd train sweep=matrix hydra/launcher=joblib hydra.launcher.n_jobs=2": Case(),
    "kltd train sweep=matrix hydra/launcher=submitit_local": Case(),
    "kltd train -m sweep=matrix hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 "
    "hydra.launcher.timeout_min=240": Case(refused=SLURM),
    "kltd train resume=outputs/runs/<date>/<time>_<method>_s<seed>":
        Case(replace={"outputs/runs/<date>/<time>_<method>_s<seed>": "{unfinished}"}, tiny=False,
             needs=("unfinished",)),
    "kltd train resume=RUN_DIR": Case(replace={"RUN_DIR": "{unfinished}"}, tiny=False, needs=("unfinished",)),
    "kltd train data=addition model.lora.r=16 prefix=student trajectory=student": Case(),
    "kltd train data=addition model.lora.r=4 model.lora.save_merged=true": Case(),
    # the machine that runs the suite has no GPU (a GPU without bitsandbytes is refused in one line too)
    "kltd train data=addition model.lora.r=16 model.lora.quantize_base=4bit prefix=student trajectory=student":
        Case(refused=r"model.lora.quantize_base=4bit needs (a CUDA GPU|bitsandbytes)"),
    "kltd train sweep=matrix trainer.max_steps=20 eval.num_prompts=50": Case(),
    "kltd train data=addition 'eval.sets=[heldout,gsm8k,math500]' eval.samples=8 eval.pass_k=4":
        Case(replace={"'eval.sets=[heldout,gsm8k,math500]'": "'eval.sets=[heldout,gsm8k,math500]' " + LOCAL_SETS}),
    "kltd eval target=teacher 'eval.sets=[heldout]'": Case(),
    "kltd eval target=outputs/runs/<date>/<time>_<method>_s<seed> eval.samples=8":
        Case(replace={"outputs/runs/<date>/<time>_<method>_s<seed>": "{finished}"}, needs=("finished",)),
    "kltd eval -m target=student,teacher": Case(),
    "kltd compare outputs/multirun/<sweep> outputs/evals/ --against SFT --metric avg_at_k":
        Case(replace={"outputs/multirun/<sweep>": "{sweep}", "outputs/evals/": "{evals}"}, tiny=False,
             needs=("sweep", "evals")),
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k +data.chat_template_kwargs.enable_thinking=false":
        Case(refused=OFFLINE),
    # docs/teacher_layouts.md: the paper's pair in each layout (hub models and a GPU)
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student": Case(refused=OFFLINE),
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student model.device=cuda:0 "
    "model.teacher_device=cuda:1": Case(refused=OFFLINE),
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student distributed.nproc_per_node=8 "
    "distributed.strategy=fsdp": Case(refused=OFFLINE, after=("trainer.batch_size=8",)),  # TINY's 4 rows: not 8 shares
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student model.lora.r=16 "
    "model.lora.quantize_base=4bit": Case(refused=OFFLINE),
    "kltd serve-teacher Qwen/Qwen3-8B --host 0.0.0.0 --port 8765 --device cuda --dtype bfloat16":
        Case(tiny=False, refused=OFFLINE),
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student "
    "model.teacher_server=http://teacher-host:8765 model.teacher_top_k=20": Case(refused=OFFLINE),
    # docs/paper.md: the paper's study on a GPU with hub models and sets
    "kltd eval -m model=qwen3_8b_to_0_6b data=gsm8k target=student,teacher "
    "'eval.sets=[gsm8k,math500,amc23,aime24]' eval.samples=8 eval.pass_k=4 "
    "+data.chat_template_kwargs.enable_thinking=false": Case(refused=OFFLINE),
    "kltd train -m model=qwen3_4b_to_0_6b,qwen3_8b_to_0_6b data=gsm8k prefix=teacher,student "
    "divergence=forward_kl,reverse_kl sampling.max_new_tokens=128 'eval.sets=[gsm8k,math500,amc23,aime24]' "
    "eval.samples=8 eval.pass_k=4 eval.every=50 +data.chat_template_kwargs.enable_thinking=false": Case(refused=OFFLINE),
    "kltd compare outputs/multirun/<sweep> outputs/evals/ --metric gsm8k/avg_at_k,math500/avg_at_k,amc23/avg_at_k,"
    "aime24/avg_at_k": Case(replace={"outputs/multirun/<sweep>": "{sweep}", "outputs/evals/": "{evals}",
                                     "gsm8k/avg_at_k,math500/avg_at_k,amc23/avg_at_k,aime24/avg_at_k": "avg_at_k"},
                            tiny=False, needs=("sweep", "evals")),
    "kltd compare outputs/multirun/<sweep> --metric math500/avg_at_k --at flops":
        Case(replace={"outputs/multirun/<sweep>": "{sweep}", "math500/avg_at_k": "avg_at_k"}, tiny=False,
             needs=("sweep",)),
    "kltd train -m model=qwen3_8b_to_0_6b data=gsm8k prefix=student divergence=kl_mix loss.mix=0.1,0.3,0.5 "
    "'eval.sets=[gsm8k,math500]' eval.samples=8 eval.pass_k=4": Case(refused=OFFLINE),
    "kltd train -m model=qwen3_4b_to_0_6b data=gsm8k prefix=student divergence=forward_kl,reverse_kl rl=grpo "
    "rl.steps=200 rl.group_size=8 sampling.max_new_tokens=4096 'eval.sets=[gsm8k,math500]' eval.samples=8 "
    "eval.pass_k=4": Case(refused=OFFLINE),
    "kltd compare outputs/multirun/<sweep> --metric math500/avg_at_k,math500/pass_at_k":
        Case(replace={"outputs/multirun/<sweep>": "{sweep}", "math500/avg_at_k,math500/pass_at_k": "avg_at_k,pass_at_k"},
             tiny=False, needs=("sweep",)),
    "kltd train rl=grpo trainer.max_steps=0 model.student=outputs/runs/<date>/<time>_<method>_s<seed>":
        Case(replace={"outputs/runs/<date>/<time>_<method>_s<seed>": "{finished}"}, needs=("finished",),
             after=("trainer.max_steps=0", "rl.steps=2", "rl.batch_size=8", "rl.group_size=4")),
    "kltd train sweep=paper_rl": Case(after=("rl.steps=2", "rl.batch_size=8", "rl.group_size=4", "eval.samples=1")),
    "kltd train prefix=student trajectory=expert rl=grpo rl.steps=20":
        Case(after=("rl.steps=2", "rl.batch_size=8", "rl.group_size=4")),
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student sampling.max_new_tokens=4096 "
    "'eval.sets=[gsm8k,math500]' eval.max_new_tokens=4096": Case(refused=OFFLINE),
    "kltd train model=qwen3_8b_to_0_6b data=gsm8k prefix=student trajectory=student "
    "sampling.length_schedule=entropy_gated 'sampling.lengths=[1024,2048,4096]' sampling.entropy_min=0.3 "
    "eval.every=50 'eval.sets=[gsm8k,math500]' eval.max_new_tokens=4096":
        Case(refused=OFFLINE, after=("trainer.max_steps=3", "eval.every=1")),
}


def kltd(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kltd.app.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_every_documented_command_is_covered():
    shown = documented_commands()
    missing = {c: where for c, where in shown.items() if c not in COMMANDS}
    stale = sorted(set(COMMANDS) - set(shown))
    assert not missing, f"commands the docs show that this test does not run: {missing}"
    assert not stale, f"commands this test runs that the docs no longer show: {stale}"


def test_the_extraction_reads_blocks_continuations_comments_and_quickstart_lines():
    assert _command("kltd train prefix=student  # DAgger") == "kltd train prefix=student"
    assert _command("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/kltd train") == "kltd train"
    assert _command("pip install -e '.[vllm]'") is None
    shown = documented_commands()
    assert "kltd train -m prefix=fixed,student trajectory=expert,student" in shown
    assert any(c.startswith("kltd train model=qwen3_8b_to_0_6b data=gsm8k") and c.endswith("data.max_prompt_tokens=512")
               for c in shown)  # a command continued over three lines


ALREADY_RUN: set[tuple] = set()  # the command lines run in this module (one run each)
SERVERS: list = []  # the teacher server the commands with model.teacher_server train against
OPENAI_SERVERS: list = []  # (server, URL) of the stand-in for an OpenAI-compatible teacher server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("documented")


def _prepare(need: str, workspace: Path) -> dict:
    """Make what a command needs in the workspace; returns the placeholders it fills."""
    if need == "train.jsonl" and not (workspace / need).exists():
        from kltd.data.addition import solve

        rows = [{"prompt": f"{a}+{b}=", "completion": solve(f"{a}+{b}=")} for a in range(10, 30) for b in range(3, 9)]
        (workspace / need).write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif need == "gsm8k.parquet" and not (workspace / need).exists():
        from tests.support.fixtures import GSM8K
        import datasets

        datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in GSM8K * 8]).to_parquet(str(workspace / need))
    elif need == "teacher.jsonl" and not (workspace / need).exists():
        _prepare("train.jsonl", workspace)
        out = kltd(["make-data", "out=teacher.jsonl", "n=48", "writer=teacher", "data=file", "data.path=train.jsonl"],
                   workspace)
        assert out.returncode == 0, out.stderr[-2000:]
    elif need == "sweep":
        sweep = workspace / "outputs" / "multirun" / "corners"
        if not sweep.exists():
            out = kltd(["train", "-m", "prefix=fixed,student", "trajectory=expert,student", *TINY,
                        f"hydra.sweep.dir={sweep}"], workspace)
            assert out.returncode == 0, out.stderr[-2000:]
        return {"sweep": str(sweep)}
    elif need == "finished":
        run = workspace / "outputs" / "runs" / "finished"
        if not (run / "metrics.json").exists():
            out = kltd(["train", *TINY, f"hydra.run.dir={run}"], workspace)
            assert out.returncode == 0, out.stderr[-2000:]
        return {"finished": str(run)}
    elif need == "evals":  # the teacher evaluated on the questions the sweep's runs were evaluated on
        evals = workspace / "outputs" / "evals"
        if not (evals / "teacher" / "metrics.json").exists():
            out = kltd(["eval", "target=teacher", *TINY, f"hydra.run.dir={evals / 'teacher'}"], workspace)
            assert out.returncode == 0, out.stderr[-2000:]
        return {"evals": str(evals)}
    elif need == "teacher_server":  # the default teacher served on a free loopback port, for this module's commands
        if not SERVERS:
            from kltd.train.teacher_server import load_service, make_server

            server = make_server(load_service("markov/teacher", device="cpu"))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            SERVERS.append(server)
        return {"teacher_server": f"http://127.0.0.1:{SERVERS[0].server_address[1]}"}
    elif need == "openai_server":  # the default teacher behind a stand-in for vLLM's OpenAI-compatible server
        if not OPENAI_SERVERS:
            from tests.support.openai_stub import serve

            OPENAI_SERVERS.append(serve("markov/teacher"))
        return {"openai_server": OPENAI_SERVERS[0][1]}
    elif need == "unfinished":  # a run as a kill after step 2's checkpoint leaves it (no timing involved)
        run = workspace / "outputs" / "runs" / f"unfinished-{len(list(workspace.glob('outputs/runs/unfinished-*')))}"
        out = kltd(["train", *TINY, "trainer.max_steps=3", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3",
                    f"hydra.run.dir={run}"], workspace)
        assert out.returncode == 0, out.stderr[-2000:]
        shutil.rmtree(run / "checkpoints" / "step-000003")
        shutil.rmtree(run / "checkpoint")
        (run / "metrics.json").unlink()
        return {"unfinished": str(run)}
    return {}


def _summaries(root: Path) -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in root.glob("outputs/**/metrics.json")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_documented_command_runs_as_typed(command, workspace):
    case = COMMANDS[command]
    filled = {}
    for need in case.needs:
        filled.update(_prepare(need, workspace))
    typed = command
    for shown, used in case.replace.items():
        typed = typed.replace(shown, used.format(**filled))
    args = shlex.split(typed)[1:] + (list(TINY) if case.tiny else []) + list(case.after)
    effective = tuple(sorted({a.split("=", 1)[0]: a for a in args}.values()))  # a later key=value wins
    if effective in ALREADY_RUN:  # two documented commands that TINY makes the same (sweep=matrix with its budget)
        return
    ALREADY_RUN.add(effective)
    before = _summaries(workspace)
    out = kltd(args, workspace)
    if case.refused:
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("kltd: error: ") and re.search(case.refused, last), out.stderr[-3000:]
        assert _summaries(workspace).keys() == before.keys()  # refused before any run directory was written
        return
    assert out.returncode == 0, f"{typed}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr
    if "unfinished" in filled:
        assert "resuming" in out.stdout
    new = {p: s for p, s in _summaries(workspace).items() if before.get(p) != s}
    assert all(s["status"] == "completed" for s in new.values()), {str(p): s.get("error") for p, s in new.items()}
    if "sweep=matrix" in args:
        _a_whole_matrix(new, args, out.stderr)


def _a_whole_matrix(summaries: dict, args: list[str], stderr: str) -> None:
    """Every valid cell ran on the launcher the command names (joblib side by side by default here) and the
    sweep's comparison was written."""
    from kltd.schema.matrix import METHOD_NAMES

    assert {(s["prefix"], s["trajectory"]) for s in summaries.values()} == set(METHOD_NAMES)
    named = any(a.startswith(("hydra/launcher=", "hydra.launcher.")) for a in args)
    assert ("side by side" in stderr) != named  # a launcher named on the command line is the one used
    sweep = next(iter(summaries)).parent.parent
    assert (sweep / "results.md").is_file() and len((sweep / "results.csv").read_text().splitlines()) == 1 + 9
