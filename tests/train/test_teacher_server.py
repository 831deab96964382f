"""A teacher served by `kltd serve-teacher` (kltd.train.teacher_server) on loopback: runs against it match the
in-process teacher's when k covers the vocabulary, and a server that is down, serves another tokenizer or answers
nonsense is one line."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kltd.rollout.batch import Responses, StateBatch
from kltd.rollout.remote_teacher import RemoteTeacher, TeacherServerError
from kltd.train.data_parallel import free_port
from kltd.train.job import train_job
from kltd.train.models import load_tokenizer
from kltd.train.teacher_server import load_service, make_server
from tests.app.test_faults import run as kltd
from tests.train.test_job import tiny_config

TOY_VOCAB = 17


def serve(service):
    server = make_server(service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def toy_server():
    server, url = serve(load_service("toy/teacher", device="cpu"))
    yield url
    server.shutdown()
    server.server_close()


def losses(run_dir) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]


@pytest.mark.parametrize("prefix,trajectory,cache", [("student", "student", "off"), ("fixed", "expert", "off"),
                                                     ("fixed", "expert", "on"), ("teacher", "expert", "off")])
def test_a_served_teacher_of_the_whole_vocabulary_trains_as_the_loaded_one(toy_server, tmp_path, prefix, trajectory,
                                                                           cache):
    runs = {}
    for name, url in (("loaded", None), ("served", toy_server)):
        cfg = tiny_config(max_steps=3, log_every=1)
        cfg.prefix.source, cfg.trajectory.supervisor, cfg.cache.teacher = prefix, trajectory, cache
        cfg.cache.dir = str(tmp_path / "cache")
        cfg.model.teacher_server = url  # teacher_top_k=0: the whole vocabulary
        cfg.check()
        summary = train_job(cfg, tmp_path / name)
        runs[name] = losses(tmp_path / name)
        if url:
            assert "teacher served by" in summary["plan"]["notes"][-1]
            assert summary["eval_after"]["teacher_served"]["kl"] == "exact"  # the server's whole vocabulary
    assert [r[0] for r in runs["served"]] == [1, 2, 3]
    if cache == "on":  # the loaded teacher's logits and the served teacher's top-k form, side by side
        kinds = sorted(torch.load(path, weights_only=True)["served"] for path in (tmp_path / "cache").glob("teacher-*"))
        assert kinds == [False, True]
    # the same teacher logits (both through the model's own forward); the loss sums the same V = 17 float32 terms
    # per token in another order (the server's ids come sorted by probability): a few float32 ulps (~1e-6
    # relative) per step, and 1e-5 leaves ten times that. Teacher samples (prefix=teacher) are the same draws.
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(runs["loaded"], runs["served"]):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert norm_b == pytest.approx(norm_a, rel=1e-5)


def test_a_run_with_small_k_says_so_and_its_first_loss_bounds_the_full_one_from_below(toy_server, tmp_path):
    first = {}
    for name, url, k in (("loaded", None, 0), ("served", toy_server, 4)):
        cfg = tiny_config(max_steps=1, log_every=1)
        cfg.cache.dir = str(tmp_path / "cache")
        cfg.model.teacher_server, cfg.model.teacher_top_k = url, k
        cfg.check()
        summary = train_job(cfg, tmp_path / name)
        first[name] = losses(tmp_path / name)[0][1]
    assert any(line.startswith("model.teacher_top_k=4: every divergence") for line in summary["approximations"])
    # step 1: the same student at the same states (its samples, the same noise), so the 5-bin reverse KL is at most
    # the full one (the data-processing inequality), up to float32 rounding of the two sums
    assert first["served"] <= first["loaded"] * (1 + 1e-5)
    assert first["served"] < first["loaded"]  # and the toy teacher's tail is not empty: strictly below


def test_small_k_is_the_bucketed_divergence_of_the_loaded_teacher(toy_server):
    """The server's top-k and tail equal the loaded teacher's, so the served loss is the k + 1 bucket divergence."""
    from kltd.objectives.divergences import DivergenceSpec, log_probs
    from kltd.objectives.topk_teacher import topk_teacher_divergence
    from kltd.rollout.scoring import Scorer
    from kltd.train.models import load_model

    tokenizer = load_tokenizer("toy/student")
    client = RemoteTeacher(toy_server, 4)
    client.check(tokenizer)
    prompt = torch.tensor([[tokenizer.pad_token_id, 5, 6], [7, 8, 9]])
    batch = StateBatch(prompt, torch.tensor([[0, 1, 1], [1, 1, 1]]),
                       Responses(torch.tensor([[3, 4, 2], [5, 2, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()))
    served = client.score(batch, 2.0, TOY_VOCAB)
    teacher = load_model("toy/teacher")
    log_p = log_probs(Scorer(packed=False, vocab=TOY_VOCAB).logits(teacher, batch), 2.0).double()
    # the k largest and the tail's mass, at the temperature: float32 on the wire, compared in float64
    torch.testing.assert_close(served.logprobs.double(), log_p.gather(-1, served.ids), rtol=0, atol=1e-6)
    assert (served.logprobs.double().min(-1).values >= log_p.topk(4, dim=-1).values[..., -1] - 1e-6).all()
    tail = log_p.scatter(-1, served.ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(served.tail.double(), tail, rtol=0, atol=1e-6)
    student = torch.randn(2, 3, TOY_VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = DivergenceSpec("reverse_kl", temperature=2.0)
    got = topk_teacher_divergence(student, served.packed().double(), spec)
    # by hand: reverse KL on the k + 1 bins, q's tail as 1 - its mass on the teacher's ids
    q = torch.softmax(student / 2.0, -1)
    q_top = q.gather(-1, served.ids)
    q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p_bins = torch.cat([served.logprobs.double().exp(), served.tail.double().exp().unsqueeze(-1)], -1)
    expected = (q_bins * (q_bins / p_bins).log()).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_server_that_is_down_is_one_line(tmp_path):
    with socket_closed() as url:
        out = kltd("train", "trainer.max_steps=1", "model.device=cpu", f"model.teacher_server={url}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 1
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"the teacher server at {url} cannot be reached" in line and "kltd serve-teacher" in line


def test_a_server_of_another_tokenizer_is_one_line_before_any_model_loads(toy_server, tmp_path):
    """The default (Markov) student against the toy teacher's server."""
    out = kltd("train", "trainer.max_steps=1", "model.device=cpu", f"model.teacher_server={toy_server}",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 1
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "serves 'toy/teacher' with another tokenizer" in line
    assert "loading" not in json.loads((tmp_path / "run" / "metrics.json").read_text()).get("phases", {})


def test_malformed_answers_and_a_foreign_server_are_one_line():
    class Nonsense(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # an /info that is not a kltd server's
            self._json({"object": "list", "data": []})

        def do_POST(self):  # a score whose arrays are short
            self.rfile.read(int(self.headers["Content-Length"]))
            self._json({"ids": "AAAA", "logprobs": "AAAA", "tail": "AAAA"})

        def _json(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Nonsense)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        client = RemoteTeacher(url, 3)
        with pytest.raises(TeacherServerError, match="is not a kltd teacher server"):
            client.check(load_tokenizer("toy/student"))
        batch = StateBatch(torch.tensor([[5]]), torch.tensor([[1]]), Responses(torch.tensor([[3]]), torch.tensor([[True]])))
        with pytest.raises(TeacherServerError, match=r"returned malformed data for /score \(buffer size"):
            client.score(batch, 1.0, TOY_VOCAB)
    finally:
        server.shutdown()
        server.server_close()


def test_the_config_refuses_what_a_served_teacher_cannot_give():
    from kltd.schema.config import ConfigError

    cfg = tiny_config()
    cfg.model.teacher_server = "http://127.0.0.1:9/v1/completions"  # an endpoint, not the /v1 base
    with pytest.raises(ConfigError, match="OpenAI-compatible server's base URL"):
        cfg.check()
    cfg.model.teacher_server, cfg.loss.estimator = "http://127.0.0.1:9", "sampled_reward"
    with pytest.raises(ConfigError, match="needs the teacher's probability of any token"):
        cfg.check()
    cfg.loss.estimator, cfg.model.teacher_server = "exact", "127.0.0.1:9"
    with pytest.raises(ConfigError, match="is not a URL"):
        cfg.check()
    cfg.model.teacher_server, cfg.model.teacher_top_k = None, 8
    with pytest.raises(ConfigError, match="model.teacher_server is not set"):
        cfg.check()


class socket_closed:
    """A loopback URL where nothing listens (a port bound, then released)."""

    def __enter__(self):
        return f"http://127.0.0.1:{free_port()}"

    def __exit__(self, *exc):
        return False


def test_serve_teacher_starts_and_prints_its_address(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "kltd.app.cli", "serve-teacher", "toy/teacher", "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "kltd: serving teacher 'toy/teacher' at http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        info = RemoteTeacher(url, 0).check(load_tokenizer("toy/student"))
        assert info["vocab_size"] == TOY_VOCAB and info["model"] == "toy/teacher"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_kltd_eval_reads_a_served_teacher_and_reports_its_bounded_figures(toy_server, tmp_path):
    out = kltd("eval", "data=addition", "target=student", f"model.teacher_server={toy_server}",
               "model.teacher_top_k=4",
               "eval.num_prompts=2", "eval.batch_size=2",
               "eval.pass_k=1", "data.n_train=16", "data.n_eval=4", "model.device=cpu",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert f"served by {toy_server}" in out.stdout
    after = figures["eval_after"]
    assert after["reverse_kl_student_states"] >= 0 and after["forward_kl_teacher_states"] >= 0
    assert after["teacher_served"]["top_k"] == 4 and after["teacher_served"]["kl"].startswith("lower bound")


def test_two_processes_with_a_served_teacher_take_the_first_step_of_one(toy_server, tmp_path):
    """distributed.nproc_per_node=2 (gloo, CPU): each process asks the server for its own rows; the first step's
    loss is the one-process run's to the float32 bound tests/train/test_data_parallel.py derives (the same
    weights, the same states, only the order and blocking of the sums differ)."""
    from tests.support.tolerances import two_orders
    from tests.train.test_data_parallel import config, step_sums, trained

    runs = {}
    for nproc in (1, 2):
        cfg = config("student", "student", nproc=nproc, cache=tmp_path / f"c{nproc}", steps=1)
        cfg.model.teacher_server = toy_server  # the whole vocabulary: the served teacher is the loaded one
        runs[nproc] = trained(cfg, tmp_path / f"p{nproc}")
    terms, magnitude = step_sums(runs[1])[0]
    a, b = runs[1].losses[0], runs[2].losses[0]
    assert abs(a - b) <= two_orders(terms, magnitude), (a, b, two_orders(terms, magnitude))
    summary = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert summary["status"] == "completed" and "teacher served by" in summary["plan"]["notes"][-1]


def test_the_evaluation_of_a_served_teacher_is_the_loaded_ones_or_a_lower_bound_and_is_cached_apart(toy_server,
                                                                                                    tmp_path):
    """The evaluation before training (the same student, prompts and noise in every run) with the teacher loaded,
    served with the whole vocabulary (k = 0) and served with k = 4; one eval cache for all three."""
    figures, said = {}, {}
    for name, url, k in (("loaded", None, 0), ("whole", toy_server, 0), ("top4", toy_server, 4)):
        cfg = tiny_config(max_steps=1, log_every=1)
        cfg.sampling.lean_decoder = False  # every model by its own forward, as the server scores it
        cfg.cache.dir = str(tmp_path / "cache")
        cfg.model.teacher_server, cfg.model.teacher_top_k = url, k
        cfg.check()
        summary = train_job(cfg, tmp_path / name)
        figures[name], said[name] = summary["eval_before"], summary
    # three cache entries: a served evaluation never reads the loaded one's, nor one of another k
    assert len(list((tmp_path / "cache").glob("eval-before-*.json"))) == 3
    assert figures["whole"]["teacher_served"]["kl"] == "exact"
    assert figures["top4"]["teacher_served"]["kl"].startswith("lower bound")
    assert any("so are the evaluation's KL figures" in line for line in said["top4"]["approximations"])
    assert "teacher samples drawn by the server" in said["whole"]["plan"]["notes"][-1]
    # per token, V = 17 float32 terms of magnitude below 20 (|log p| and |log q| of the toy models, whose
    # smallest probabilities are above e^-20) summed in another order: under 17 * 20 * 2^-24 each; a question's
    # figure sums at most max_new_tokens of them
    budget = figures["loaded"]["max_new_tokens"]
    tolerance = budget * TOY_VOCAB * 20 * 2.0 ** -24
    for metric in ("reverse_kl_student_states", "forward_kl_teacher_states"):
        full, whole, top4 = (figures[n]["sets"][figures[n]["set"]]["per_question"][metric]
                             for n in ("loaded", "whole", "top4"))
        assert whole == pytest.approx(full, abs=tolerance), metric
        assert all(b <= a + tolerance for a, b in zip(full, top4)), metric  # the data-processing inequality
        assert sum(top4) < sum(full), metric  # the toy teacher's tail is not empty: strictly below
    assert figures["whole"]["teacher_tokens_generated"] == figures["loaded"]["teacher_tokens_generated"]


def test_a_teacher_that_cannot_sample_with_kltds_stream_gives_only_the_figures_on_student_samples(toy_server):
    """An OpenAI-compatible server (its `info` says openai) scores but does not draw kltd's samples: the evaluation
    keeps the reverse KL on the student's samples, equal to the one a kltd server's client gives, and leaves the
    figures on teacher samples out. The scores here come from the toy server, so only the evaluation's choice of
    figures is under test (the OpenAI client's scores: tests/train/test_openai_teacher.py)."""
    from kltd.data.addition import make_splits
    from kltd.schema.config import EvalConfig
    from kltd.train.evaluation import evaluate
    from kltd.train.models import load_model

    tokenizer, student = load_tokenizer("toy/student"), load_model("toy/student")
    _, held_out = make_splits(0, 0, 2)
    settings = EvalConfig(num_prompts=2, batch_size=2, max_new_tokens=8, pass_k=1, samples=2)
    results = {}
    for openai in (False, True):
        client = RemoteTeacher(toy_server, 0)
        client.check(tokenizer)
        client.info = {**client.info, "openai": openai}
        results[openai] = evaluate(student, None, tokenizer, held_out, settings, checker=None, vocab=TOY_VOCAB,
                                   served=client)
    kltd_server, openai_server = results[False], results[True]
    assert openai_server["teacher_served"]["teacher_samples"] is False
    assert "forward_kl_teacher_states" not in openai_server and openai_server["teacher_tokens_generated"] == 0
    assert kltd_server["forward_kl_teacher_states"] >= 0 and kltd_server["teacher_tokens_generated"] > 0
    # the same student samples (the teacher's draws come after them) and the same scores
    assert openai_server["reverse_kl_student_states"] == kltd_server["reverse_kl_student_states"]
    from kltd.rollout.plan import served_notes

    cfg = tiny_config()
    cfg.model.teacher_server, cfg.model.teacher_top_k = "http://127.0.0.1:8000/v1", 8
    (note,) = served_notes(cfg)
    assert "reverse KL on the student's samples" in note and "(lower bounds)" in note
    assert "no figures on teacher samples" in note
