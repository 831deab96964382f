"""A teacher served to training processes over HTTP (`kltd serve-teacher MODEL`), so that one copy of it serves many.

Endpoints (JSON; the client is kltd.rollout.remote_teacher):
    GET  /info    protocol, model name, vocabulary size, tokenizer fingerprint, the model's config (for FLOP counts)
    POST /score   states (prompt and response ids) -> per response position the top-k ids, their log-probabilities
                  and the log of the remaining mass, at the asked temperature
    POST /sample  prompts and the rows' noise -> the teacher's samples (the same draws as kltd's sampler in-process)

The standard library's ThreadingHTTPServer: no dependency, one lock around the model (requests run one at a
time, so memory stays that of one batch). It binds to 127.0.0.1 unless told otherwise: it runs no
authentication, so expose it only on a network you trust.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from kltd.objectives.divergences import log_probs
from kltd.rollout.batch import Responses, StateBatch
from kltd.rollout.noise import RowNoise
from kltd.rollout.plan import route
from kltd.rollout.remote_teacher import PROTOCOL, encode_array, tokenizer_fingerprint
from kltd.rollout.sampling import Sampler
from kltd.rollout.scoring import Scorer, device_of


class BadRequest(ValueError):
    """A request this server cannot answer: HTTP 400 with this line."""


class TeacherService:
    """The model behind the endpoints; usable without HTTP (tests call it directly)."""

    def __init__(self, model, tokenizer, name: str, source: str | None = None):
        self.model, self.tokenizer, self.name = model.eval().requires_grad_(False), tokenizer, name
        self.source = source  # a fingerprint of the model's files: what a client's teacher cache is keyed by
        self.vocab = len(tokenizer)
        self.scorer = Scorer(packed=False, vocab=self.vocab)
        self.lock = threading.Lock()

    def info(self) -> dict:
        return {"protocol": PROTOCOL, "model": self.name, "vocab_size": self.vocab,
                "fingerprint": tokenizer_fingerprint(self.tokenizer), "config": self.model.config.to_dict(),
                "source": self.source, "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")}

    def _ids(self, request: dict, key: str, dtype=torch.long) -> torch.Tensor:
        try:
            out = torch.tensor(request[key], dtype=dtype, device=device_of(self.model))
        except (KeyError, TypeError, ValueError) as error:
            raise BadRequest(f"'{key}' must be a list of equal-length lists of integers ({error})") from None
        if out.ndim != 2:
            raise BadRequest(f"'{key}' must be a list of equal-length lists of integers")
        return out

    def score(self, request: dict) -> dict:
        k, temperature = request.get("top_k"), request.get("temperature", 1.0)
        if not isinstance(k, int) or not 1 <= k <= self.vocab:
            raise BadRequest(f"top_k must be an integer in [1, {self.vocab}]")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise BadRequest("temperature must be > 0")
        prompt_ids, prompt_mask = self._ids(request, "prompt_ids"), self._ids(request, "prompt_mask")
        tokens, mask = self._ids(request, "tokens"), self._ids(request, "mask").bool()
        if prompt_ids.shape != prompt_mask.shape or tokens.shape != mask.shape or tokens.shape[0] != prompt_ids.shape[0]:
            raise BadRequest("prompt_ids/prompt_mask and tokens/mask must have matching shapes and rows")
        if (prompt_ids.numel() and int(prompt_ids.max()) >= self.vocab) or (tokens.numel() and int(tokens.max()) >= self.vocab):
            raise BadRequest(f"token ids must lie below the vocabulary size {self.vocab}")
        batch = StateBatch(prompt_ids, prompt_mask, Responses(tokens, mask))
        with self.lock, torch.inference_mode():
            log_p = log_probs(self.scorer.logits(self.model, batch), float(temperature))
            top = log_p.topk(k, dim=-1)
            # the tail as a logsumexp of what is left: exact, no cancellation in 1 - sum(top-k)
            rest = log_p.scatter(-1, top.indices, -math.inf)
            tail = rest.logsumexp(-1) if k < log_p.shape[-1] else torch.full(rest.shape[:-1], -math.inf, device=rest.device)
        return {"shape": list(top.indices.shape), "ids": encode_array(top.indices.cpu().numpy().astype("<i4")),
                "logprobs": encode_array(top.values.float().cpu().numpy().astype("<f4")),
                "tail": encode_array(tail.float().cpu().numpy().astype("<f4"))}

    def sample(self, request: dict) -> dict:
        prompt_ids, prompt_mask = self._ids(request, "prompt_ids"), self._ids(request, "prompt_mask")
        try:
            n = request["noise"]
            noise = RowNoise(int(n["seed"]), int(n["step"]), tuple(int(r) for r in n["rows"]), str(n["purpose"]))
            budget, temperature, top_p = int(request["max_new_tokens"]), float(request["temperature"]), float(request["top_p"])
        except (KeyError, TypeError, ValueError) as error:
            raise BadRequest(f"/sample needs noise (seed, step, rows, purpose), max_new_tokens, temperature and top_p "
                             f"({error})") from None
        if len(noise.rows) != prompt_ids.shape[0] or budget < 0:
            raise BadRequest("noise.rows must name one row per prompt, and max_new_tokens must be >= 0")
        prefix = None
        if request.get("prefix") is not None:
            prefix = Responses(self._ids(request["prefix"], "tokens"), self._ids(request["prefix"], "mask").bool())
        sampler = Sampler(self.model, self.tokenizer, budget, temperature, top_p, lean=route(self.model, packed=False, lean=True).decoder == "lean",
                          vocab=self.vocab)
        with self.lock, torch.inference_mode():
            out = sampler(prompt_ids, prompt_mask, noise, prefix=prefix)
        return {"tokens": out.tokens.tolist(), "mask": out.mask.long().tolist()}


def handler_for(service: TeacherService):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - quiet: a training run makes a request a step
            pass

        def _send(self, code: int, body: dict | str) -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/info":
                self._send(200, service.info())
            else:
                self._send(404, f"no such endpoint {self.path}; kltd's teacher server has /info, /score, /sample")

        def do_POST(self):
            route = {"/score": service.score, "/sample": service.sample}.get(self.path.rstrip("/"))
            if route is None:
                self._send(404, f"no such endpoint {self.path}; kltd's teacher server has /info, /score, /sample")
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(request, dict):
                    raise BadRequest("the body must be a JSON object")
                self._send(200, route(request))
            except (BadRequest, json.JSONDecodeError) as error:
                self._send(400, str(error))

    return Handler


def make_server(service: TeacherService, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The server, bound (port 0: a free one, `server.server_address[1]`), not yet serving."""
    server = ThreadingHTTPServer((host, port), handler_for(service))
    server.daemon_threads = True
    return server


def load_service(reference: str, dtype: str = "float32", device: str = "auto",
                 trust_remote_code: bool = False) -> TeacherService:
    """A TeacherService for any model kltd can load (the shipped toy/teacher, a directory, a hub id, a run)."""
    from kltd.train.models import load_model, load_tokenizer, pick_device, resolve_model_path
    from kltd.train.teacher_cache import source_fingerprint

    tokenizer = load_tokenizer(reference, trust_remote_code)
    model = load_model(reference, dtype, pick_device(device), trust_remote_code)
    return TeacherService(model, tokenizer, reference, source_fingerprint(resolve_model_path(reference)))

