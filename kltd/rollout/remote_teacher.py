"""The client of a teacher served by another process (`kltd serve-teacher`, kltd.train.teacher_server).

A training process with model.teacher_server=URL loads no teacher: it sends its states (token ids) to the server,
which answers per position with the teacher's top-k ids, their log-probabilities and the log of the mass left
(kltd.objectives.topk_teacher.TopKTeacher), and samples for the prefix axis (`RemoteSampler`). The wire format is
JSON; the numbers of a score come back as base64 little-endian arrays (exact, and a tenth of their text's size).

Failures are one line (TeacherServerError, a ValueError, so the command reports it without a traceback): the server
cannot be reached after a few tries with backoff, it serves another tokenizer (checked once at the start, before
any model is loaded), or it answers with something malformed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

from kltd.objectives.topk_teacher import TopKTeacher
from kltd.rollout.batch import Responses, StateBatch
from kltd.rollout.noise import RowNoise

PROTOCOL = 1  # the version of the endpoints below; a server of another version is refused at the start
RETRIES = 3  # tries after the first, with BACKOFF_S, twice that, ... between them
BACKOFF_S = 0.5


class TeacherServerError(ValueError):
    """The teacher server cannot be used: reported as one line."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id) and the special ids: what kltd requires two models to share."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def encode_array(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def decode_array(text, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The array a server sent, or ValueError when its size does not match the shape."""
    data = base64.b64decode(text, validate=True)
    out = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    if out.size != int(np.prod(shape)):
        raise ValueError(f"{out.size} numbers for shape {list(shape)}")
    return out.reshape(shape)


def batch_payload(batch: StateBatch) -> dict:
    return {"prompt_ids": batch.prompt_ids.tolist(), "prompt_mask": batch.prompt_mask.long().tolist(),
            "tokens": batch.responses.tokens.tolist(), "mask": batch.responses.mask.long().tolist()}


@dataclass
class RemoteTeacher:
    """The connection to one teacher server. `info` is what its /info answered (kept after `check`)."""

    url: str
    top_k: int
    timeout_s: float = 120.0
    retries: int = RETRIES
    info: dict | None = None

    def __post_init__(self):
        self.url = self.url.rstrip("/")

    def _request(self, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as error:  # the server answered: its line says what is wrong, no retry
                detail = error.read().decode(errors="replace").strip()[:300]
                raise TeacherServerError(f"the teacher server at {self.url} refused {path}: HTTP {error.code} "
                                         f"{detail}") from None
            except (urllib.error.URLError, OSError) as error:  # down, refused, timed out: try again
                problem = str(getattr(error, "reason", error))
                continue
            try:
                answer = json.loads(body)
            except ValueError:
                raise TeacherServerError(f"the teacher server at {self.url} returned malformed data for {path} "
                                         "(not JSON); is it a kltd teacher server (kltd serve-teacher)?") from None
            if not isinstance(answer, dict):
                raise TeacherServerError(f"the teacher server at {self.url} returned malformed data for {path}")
            return answer
        raise TeacherServerError(f"the teacher server at {self.url} cannot be reached ({problem}; {self.retries + 1} "
                                 "tries); start it with kltd serve-teacher MODEL --port PORT or fix "
                                 "model.teacher_server")

    def check(self, tokenizer) -> dict:
        """Ask /info once and refuse a server of another protocol or tokenizer (before any model is loaded)."""
        info = self._request("/info")
        if info.get("protocol") != PROTOCOL or not isinstance(info.get("fingerprint"), str):
            raise TeacherServerError(f"{self.url} is not a kltd teacher server of protocol {PROTOCOL} (its /info "
                                     "has no protocol and fingerprint); start one with kltd serve-teacher MODEL")
        mine = tokenizer_fingerprint(tokenizer)
        if info["fingerprint"] != mine:
            raise TeacherServerError(f"the teacher server at {self.url} serves '{info.get('model')}' with another "
                                     f"tokenizer (fingerprint {info['fingerprint']}, the student's {mine}); kltd "
                                     "compares next-token distributions token by token, so serve a teacher of "
                                     "the student's vocabulary")
        vocab = info.get("vocab_size")
        if isinstance(vocab, int) and self.top_k == 0:  # 0: the whole vocabulary (the exact loss)
            self.top_k = vocab
        if not isinstance(vocab, int) or not 1 <= self.top_k <= vocab:
            raise TeacherServerError(f"model.teacher_top_k={self.top_k} must lie in [1, {vocab}] (the served "
                                     "teacher's vocabulary)")
        self.info = info
        return info

    def score(self, batch: StateBatch, temperature: float, vocab: int | None) -> TopKTeacher:
        """The teacher at every response state of the batch: [B, N] positions, k ids, log-probabilities and tail."""
        answer = self._request("/score", {**batch_payload(batch), "top_k": self.top_k, "temperature": temperature,
                                          "vocab": vocab})
        rows, width = batch.responses.tokens.shape
        shape = (rows, width, self.top_k)
        try:
            ids = decode_array(answer["ids"], np.int32, shape)
            logprobs = decode_array(answer["logprobs"], np.float32, shape)
            tail = decode_array(answer["tail"], np.float32, shape[:2])
            limit = vocab or (self.info or {}).get("vocab_size")
            if ids.size and (ids.min() < 0 or (limit and ids.max() >= limit)):
                raise ValueError("token ids outside the vocabulary")
            if np.isnan(logprobs).any() or np.isnan(tail).any() or (logprobs > 1e-3).any():
                raise ValueError("log-probabilities that are NaN or positive")
        except (KeyError, TypeError, ValueError) as error:
            raise TeacherServerError(f"the teacher server at {self.url} returned malformed data for /score "
                                     f"({error}); is it a kltd teacher server of protocol {PROTOCOL}?") from None
        device = batch.prompt_ids.device
        return TopKTeacher(torch.from_numpy(ids.astype(np.int64)).to(device), torch.from_numpy(logprobs.copy()).to(device),
                           torch.from_numpy(tail.copy()).to(device))

    def sample(self, prompt_ids, prompt_mask, noise: RowNoise, *, max_new_tokens: int, temperature: float,
               top_p: float, prefix: Responses | None = None) -> Responses:
        payload = {"prompt_ids": prompt_ids.tolist(), "prompt_mask": prompt_mask.long().tolist(),
                   "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                   "noise": {"seed": noise.seed, "step": noise.step, "rows": list(noise.rows),
                             "purpose": noise.purpose}}
        if prefix is not None:
            payload["prefix"] = {"tokens": prefix.tokens.tolist(), "mask": prefix.mask.long().tolist()}
        answer = self._request("/sample", payload)
        try:
            tokens = torch.tensor(answer["tokens"], dtype=torch.long)
            mask = torch.tensor(answer["mask"], dtype=torch.bool)
            if tokens.ndim != 2 or tokens.shape != mask.shape or tokens.shape[0] != prompt_ids.shape[0]:
                raise ValueError(f"{list(tokens.shape)} tokens for {prompt_ids.shape[0]} prompts")
        except (KeyError, TypeError, ValueError) as error:
            raise TeacherServerError(f"the teacher server at {self.url} returned malformed data for /sample "
                                     f"({error})") from None
        return Responses(tokens.to(prompt_ids.device), mask.to(prompt_ids.device))


@dataclass
class RemoteSampler:
    """The teacher's sampler when it is served (a kltd.rollout.sampling.StateSampler): the same draws as kltd's
    sampler in the server's process, keyed by the rows' noise (kltd.rollout.noise)."""

    teacher: RemoteTeacher
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0

    def __call__(self, prompt_ids, prompt_mask, generator, prefix: Responses | None = None) -> Responses:
        noise = generator if isinstance(generator, RowNoise) else RowNoise.from_generator(generator, prompt_ids.shape[0])
        return self.teacher.sample(prompt_ids, prompt_mask, noise, max_new_tokens=self.max_new_tokens,
                                   temperature=self.temperature, top_p=self.top_p, prefix=prefix)

    def push_weights(self, model, step: int) -> None:
        pass

    def staleness(self, step: int) -> int | None:
        return None

    def close(self) -> None:
        pass


def connect(url: str, top_k: int) -> "RemoteTeacher":
    """The client for model.teacher_server: an OpenAI-compatible server (vLLM) when the URL's path ends in /v1,
    else kltd's own (kltd serve-teacher)."""
    if url.rstrip("/").endswith("/v1"):
        return OpenAITeacher(url, top_k)
    return RemoteTeacher(url, top_k)


PROBE_IDS = 256  # the student's first ids (specials skipped) make the text both tokenizers must split alike


@dataclass
class OpenAITeacher(RemoteTeacher):
    """A teacher behind an OpenAI-compatible server's /v1/completions with prompt log-probabilities (vLLM).

    Each row's prompt and response go as one prompt of token ids with max_tokens=1 and prompt_logprobs=k; vLLM
    answers, per prompt position after the first (the first is None), the log-softmax of the model's raw logits
    (temperature 1: prompt tokens skip the sampling processors) at the top k ids and at the position's actual
    token (k or k + 1 entries, each with its rank). At a loss temperature T != 1 the top k at T cannot be
    rebuilt from the top k at 1 (the normaliser needs every logit), so the client asks for the whole vocabulary
    (prompt_logprobs=-1; the server needs --max-logprobs -1) and applies T itself. The tail is
    log(1 - sum of the k probabilities). Samples are not offered (the random stream is the server's, not kltd's):
    prefix=teacher and mixed are refused at the start (kltd.schema.config).
    """

    def check(self, tokenizer) -> dict:
        """The served model (/v1/models) and its tokenizer (the server's /tokenize of a probe text) against the
        student's: the same ids for the same text, or one line."""
        models = self._request("/models")
        try:
            card = models["data"][0]
            name, root = str(card["id"]), card.get("root") or card["id"]
        except (KeyError, IndexError, TypeError):
            raise TeacherServerError(f"{self.url}/models lists no model; is it an OpenAI-compatible server "
                                     "(vllm serve MODEL)?") from None
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(min(len(tokenizer), PROBE_IDS)) if i not in special]
        probe = tokenizer.decode(ids)
        mine = tokenizer(probe, add_special_tokens=False)["input_ids"]
        base = self.url[: -len("/v1")]
        theirs = self._request_at(base, "/tokenize", {"model": name, "prompt": probe, "add_special_tokens": False})
        if theirs.get("tokens") != mine:
            raise TeacherServerError(f"the teacher server at {self.url} serves '{name}' with another tokenizer (a "
                                     f"probe text of {len(mine)} student tokens comes back as "
                                     f"{len(theirs.get('tokens') or [])} other ids); kltd compares next-token "
                                     "distributions token by token, so serve a teacher of the student's vocabulary")
        vocab = len(tokenizer)
        if self.top_k == 0:
            self.top_k = vocab
        if not 1 <= self.top_k <= vocab:
            raise TeacherServerError(f"model.teacher_top_k={self.top_k} must lie in [1, {vocab}] (the served "
                                     "teacher's vocabulary)")
        self.info = {"model": name, "source": root, "vocab_size": vocab, "config": model_config(root, tokenizer),
                     "dtype": None, "openai": True, "max_model_len": card.get("max_model_len")}
        return self.info

    def _request_at(self, base: str, path: str, payload: dict) -> dict:
        url, self.url = self.url, base
        try:
            return self._request(path, payload)
        finally:
            self.url = url

    def score(self, batch: StateBatch, temperature: float, vocab: int | None) -> TopKTeacher:
        k = self.top_k
        whole = temperature != 1.0 or k >= (vocab or self.info["vocab_size"])
        rows, width = batch.responses.tokens.shape
        prompts, starts, lengths = [], [], []
        for prompt, pmask, tokens, mask in zip(batch.prompt_ids.tolist(), batch.prompt_mask.tolist(),
                                               batch.responses.tokens.tolist(), batch.responses.mask.tolist()):
            head = [t for t, m in zip(prompt, pmask) if m]
            tail = [t for t, m in zip(tokens, mask) if m]
            prompts.append(head + tail)
            starts.append(len(head))
            lengths.append(len(tail))
        # unscored (masked) positions: uniform on the first k ids (distinct ids, as a scored position has), unread
        ids = np.broadcast_to(np.arange(k, dtype=np.int64), (rows, width, k)).copy()
        logprobs = np.full((rows, width, k), -math.log(k), np.float64)
        tails = np.full((rows, width), -math.inf, np.float64)
        scored = [i for i in range(rows) if lengths[i]]
        if scored:
            answer = self._request("/completions", {
                "model": self.info["model"], "prompt": [prompts[i] for i in scored], "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": -1 if whole else k})
            limit = vocab or self.info["vocab_size"]
            try:
                choices = sorted(answer["choices"], key=lambda c: c["index"])
                if len(choices) != len(scored):
                    raise ValueError(f"{len(choices)} choices for {len(scored)} prompts")
                for i, choice in zip(scored, choices):
                    entries = choice["prompt_logprobs"]
                    for j in range(lengths[i]):
                        top, rest = position_topk(entries[starts[i] + j], k, temperature, whole, limit)
                        ids[i, j], logprobs[i, j], tails[i, j] = top[0], top[1], rest
                if ids.max(initial=0) >= limit or ids.min(initial=0) < 0:
                    raise ValueError("token ids outside the vocabulary")
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
                raise TeacherServerError(f"the teacher server at {self.url} returned malformed data for /completions "
                                         f"({error}); is it vLLM's OpenAI-compatible server?") from None
        device = batch.prompt_ids.device
        return TopKTeacher(torch.from_numpy(ids).to(device), torch.from_numpy(logprobs.astype(np.float32)).to(device),
                           torch.from_numpy(tails.astype(np.float32)).to(device))

    def sample(self, *args, **kwargs) -> Responses:
        raise TeacherServerError(f"the teacher server at {self.url} is OpenAI-compatible: kltd does not sample "
                                 "through it (its random stream is not kltd's); use prefix=student or fixed")


def position_topk(entry: dict, k: int, temperature: float, whole: bool, vocab: int) -> tuple[tuple[list, list], float]:
    """One position's top k (ids, log-probabilities at the temperature) and tail from vLLM's {id: {logprob, rank}}:
    the k entries of rank 1..k (the actual token is added at its own rank when outside them). `whole`: every id
    came back, so the ids past the tokenizer's `vocab` (embedding padding) are dropped as kltd's own scorer drops
    them, the temperature is applied here and the top k taken after it."""
    pairs = [(int(token), float(v["logprob"]), int(v.get("rank") or 0)) for token, v in entry.items()]
    if whole:
        pairs = [p for p in pairs if p[0] < vocab]
        raw = np.array([p[1] for p in pairs], np.float64) / temperature
        logp = raw - np.logaddexp.reduce(raw)
        order = np.argsort(-logp, kind="stable")[:k]
        top_ids, top_lp = [pairs[o][0] for o in order], logp[order]
        rest = np.delete(logp, order)
        tail = float(np.logaddexp.reduce(rest)) if rest.size else -math.inf
        return (top_ids, list(top_lp)), tail
    pairs.sort(key=lambda p: (p[2] if p[2] > 0 else math.inf, -p[1]))
    top = pairs[:k]
    if len(top) < k:
        raise ValueError(f"{len(top)} log-probabilities for top_k={k}")
    top_lp = np.array([p[1] for p in top], np.float64)
    probs = np.exp(top_lp)
    # k is below the vocabulary here, so the tail is not empty; 1 - mass is known only to the float32 rounding of
    # the k log-probabilities carried to their probabilities (p * |log p| * 2^-24 each, 2^-24 for the sum), and
    # is kept at least that (a rounded mass of 1 would give the tail no probability, and reverse KL infinity)
    floor = float((probs * (np.abs(top_lp) + 1.0)).sum()) * 2.0 ** -24
    tail = math.log(max(1.0 - float(probs.sum()), floor))
    return ([p[0] for p in top], list(top_lp)), tail


def model_config(root: str, tokenizer) -> dict:
    """The served model's config for the run's compute figures: its directory's config.json when the server's model
    is a local directory, else the student's (the figures then count the teacher at the student's size)."""
    from transformers import AutoConfig

    for source in (root, tokenizer.name_or_path):
        try:
            return AutoConfig.from_pretrained(source, local_files_only=True).to_dict()
        except (OSError, ValueError):
            continue
    return {"hidden_size": 1, "num_hidden_layers": 0, "num_attention_heads": 1, "vocab_size": len(tokenizer)}
