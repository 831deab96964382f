"""The teacher cache: teacher logits at fixed (dataset) states, computed once and kept on disk.

With prefix=fixed the states never change, so every cell and seed of a sweep asks the teacher the same
questions. The cache answers them from a file whose name is a hash of everything the answer depends on
(teacher files, tokenizer, the training examples, the storage format), so a changed teacher, dataset or
setting gets a new entry and a stale one is never read.

Formats: "full" keeps every logit (exact); "topk" keeps the teacher's k largest logits per position and
spreads the remaining probability mass evenly over the other tokens (an approximation that bounds the
file at k numbers per position, for large vocabularies). A served teacher (model.teacher_server) is kept in
the form it answers in: its top-k ids, their log-probabilities at the loss's temperature and the tail's log-mass
(kltd.objectives.topk_teacher.TopKTeacher), which lookups return; its entry is keyed by the server's model
files, its k and the temperature.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kltd.files import atomic_write, remove_stale_temporaries
from kltd.objectives.topk_teacher import TopKTeacher
from kltd.rollout.batch import StateBatch, encode_prompts, encode_responses
from kltd.rollout.scoring import Scorer

CACHE_VERSION = 3  # 3: entries keyed by prompt and response (a prompt may come with several responses)
CONTENT_HASH_LIMIT = 256 * 2**20  # larger files are fingerprinted by name, size and mtime


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > CONTENT_HASH_LIMIT:
        return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def directory_fingerprint(directory: str | Path) -> str:
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(_file_fingerprint(p) for p in files).encode()).hexdigest()


def source_fingerprint(path: str) -> str:
    """A local directory by its files; a hub model by its name and the cached snapshot's revision."""
    if Path(path).is_dir():
        return directory_fingerprint(path)
    revision = "unknown"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json")
        if isinstance(found, str):
            revision = Path(found).parent.name  # .../snapshots/<commit>/config.json
    except Exception:
        pass
    return f"hub:{path}@{revision}"


def examples_fingerprint(examples: list) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.prompt}\x00{e.response}\x01".encode())
    return digest.hexdigest()


def entry_key(example) -> str:
    """An example's entry: its prompt and response (the Markov task's prompts repeat, each with many responses)."""
    return f"{example.prompt}\x00{example.response}"


@dataclass(frozen=True)
class CacheKey:
    teacher: str  # fingerprint of the teacher (its directory's files, or its hub name and revision)
    tokenizer: str  # fingerprint of the tokenizer, its end token and its size
    examples: str
    dtype: str
    format: str
    top_k: int

    def digest(self) -> str:
        payload = json.dumps({"version": CACHE_VERSION, **self.__dict__}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _score_in_chunks(tokenizer, examples: list, batch_size: int, device, score, counter, scored
                     ) -> tuple[dict[str, int], Tensor]:
    """`score(states)` on every chunk of batch_size examples; (each example's entry index, the entries' offsets
    into the response states, row after row). `counter(1)` and `scored(states)` are told of each pass."""
    offsets = [0]
    # batches of similar length carry less padding; entries are found by key, so order is free
    examples = sorted(examples, key=lambda e: (len(e.prompt) + len(e.response), e.prompt))
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [e.prompt for e in chunk], device)
        responses = encode_responses(tokenizer, [e.response for e in chunk], device)
        states = StateBatch(prompt_ids, prompt_mask, responses)
        score(states)
        if counter:
            counter(1)
        if scored:
            scored(states)
        offsets += (offsets[-1] + responses.mask.sum(1).cumsum(0)).tolist()
    return {entry_key(e): i for i, e in enumerate(examples)}, torch.tensor(offsets)


class TeacherCache:
    """Teacher logits [N_i, V] for every training example i, looked up by its prompt and response (entry_key)."""

    def __init__(self, values: Tensor, offsets: Tensor, index: dict[str, int], vocab_size: int,
                 indices: Tensor | None = None, tail: Tensor | None = None, served: bool = False):
        self.values, self.offsets, self.index, self.vocab_size = values, offsets, index, vocab_size
        self.indices, self.tail = indices, tail  # topk and served formats only
        self.served = served  # values: log-probabilities of a served teacher's top-k ids, tail: the rest's log-mass

    def lookup(self, batch: StateBatch) -> Tensor | TopKTeacher:
        """[B, N, V] teacher logits at the batch's response states (zeros past each row's end); a served teacher's
        entries as a TopKTeacher [B, N, k] (id 0, log-probability 0 past each row's end: never supervised)."""
        n = batch.responses.tokens.shape[1]
        if self.served:
            return self._served_lookup(batch, n)
        out = torch.zeros(batch.num_sequences, n, self.vocab_size, dtype=self.values.dtype)
        for row, example in enumerate(batch.examples):
            i = self.index[entry_key(example)]
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            out[row, : end - start] = self._rows(start, end)
        return out.to(batch.prompt_ids.device)

    def _served_lookup(self, batch: StateBatch, n: int) -> TopKTeacher:
        k = self.indices.shape[1]
        ids = torch.zeros(batch.num_sequences, n, k, dtype=torch.long)
        logprobs = torch.zeros(batch.num_sequences, n, k, dtype=self.values.dtype)
        tail = torch.zeros(batch.num_sequences, n, dtype=self.values.dtype)
        for row, example in enumerate(batch.examples):
            i = self.index[entry_key(example)]
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            ids[row, : end - start] = self.indices[start:end].long()
            logprobs[row, : end - start] = self.values[start:end]
            tail[row, : end - start] = self.tail[start:end]
        return TopKTeacher(ids, logprobs, tail).to(batch.prompt_ids.device)

    def _rows(self, start: int, end: int) -> Tensor:
        if self.indices is None:
            return self.values[start:end]
        # topk: the kept logits, and the rest of the mass spread evenly (log-space, relative to the kept ones)
        rows = self.tail[start:end].unsqueeze(1).expand(-1, self.vocab_size).clone()
        return rows.scatter(1, self.indices[start:end].long(), self.values[start:end])

    @staticmethod
    def build(teacher, tokenizer, examples: list, *, fmt: str = "full", top_k: int = 64, batch_size: int = 256,
              counter=None, packed: bool = True, scored=None, served=None, temperature: float = 1.0
              ) -> "TeacherCache":
        """One teacher pass per batch of examples; `counter(n)` is told how many passes ran, `scored(states)`
        each StateBatch a pass ran over (kltd.train.compute counts its FLOPs).

        The pass is the packed forward where the teacher allows it (real tokens only, logits at the response
        states alone), else the teacher's own forward (always with packed=False); the two agree to float
        rounding (tests/train/test_teacher_cache.py).
        """
        if served is not None:  # kltd.rollout.remote_teacher.RemoteTeacher: the server scores, nothing is loaded here
            return TeacherCache._build_served(served, tokenizer, examples, batch_size, counter, scored, temperature)
        device = next(teacher.parameters()).device
        scorer = Scorer(packed=packed, vocab=len(tokenizer))  # the tokenizer's ids only (padded output rows are not compared)
        values, indices, tails, width = [], [], [], []

        def score(states: StateBatch) -> None:
            with torch.inference_mode():
                rows = scorer.logit_rows(teacher, states)
                for part in rows.parts():  # every response state of the chunk, row after row
                    kept = rows(part).float().cpu()
                    if fmt == "topk":
                        kept, idx, tail = _topk_with_even_tail(kept, top_k)
                        indices.append(idx)
                        tails.append(tail)
                    values.append(kept)
            width[:] = [rows.width]

        index, offsets = _score_in_chunks(tokenizer, examples, batch_size, device, score, counter, scored)
        if fmt == "topk":
            return TeacherCache(torch.cat(values), offsets, index, width[0], torch.cat(indices), torch.cat(tails))
        return TeacherCache(torch.cat(values), offsets, index, width[0])

    @staticmethod
    def _build_served(served, tokenizer, examples: list, batch_size: int, counter, scored, temperature: float
                      ) -> "TeacherCache":
        values, indices, tails = [], [], []

        def score(states: StateBatch) -> None:
            top = served.score(states, temperature, len(tokenizer))
            mask = states.responses.mask  # the response states, row after row (the offsets' order)
            values.append(top.logprobs[mask].float())
            indices.append(top.ids[mask].to(torch.int32))
            tails.append(top.tail[mask].float())

        index, offsets = _score_in_chunks(tokenizer, examples, batch_size, "cpu", score, counter, scored)
        return TeacherCache(torch.cat(values), offsets, index, len(tokenizer), torch.cat(indices), torch.cat(tails),
                            served=True)

    def __len__(self) -> int:
        return len(self.index)

    def merged(self, other: "TeacherCache") -> "TeacherCache":
        """This cache's entries plus those of `other` for keys this one lacks."""
        new = [(key, i) for key, i in other.index.items() if key not in self.index]
        if not new:
            return self
        spans = [(int(other.offsets[i]), int(other.offsets[i + 1])) for _, i in new]

        def joined(mine: Tensor | None, theirs: Tensor | None) -> Tensor | None:
            return None if mine is None else torch.cat([mine] + [theirs[a:b] for a, b in spans])

        lengths = torch.tensor([b - a for a, b in spans])
        offsets = torch.cat([self.offsets, self.offsets[-1] + lengths.cumsum(0)])
        index = {**self.index, **{key: len(self.index) + j for j, (key, _) in enumerate(new)}}
        return TeacherCache(joined(self.values, other.values), offsets, index, self.vocab_size,
                            joined(self.indices, other.indices), joined(self.tail, other.tail), self.served)

    def save(self, path: Path) -> None:
        """Atomic (kltd.files): a cache file that exists is whole."""
        payload = {"values": self.values, "offsets": self.offsets, "keys": list(self.index),
                   "vocab_size": self.vocab_size, "indices": self.indices, "tail": self.tail, "served": self.served}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @staticmethod
    def load(path: Path) -> "TeacherCache":
        data = torch.load(path, weights_only=True)
        index = {key: i for i, key in enumerate(data["keys"])}
        # "served" is absent from the files of the other formats, whose layout it leaves as it was
        return TeacherCache(data["values"], data["offsets"], index, data["vocab_size"], data["indices"], data["tail"],
                            bool(data.get("served", False)))


def _topk_with_even_tail(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """[N, V] -> top-k logits [N, k], their indices [N, k], and one logit [N] for every other token such that
    the tail tokens share the teacher's remaining probability mass evenly."""
    k = min(k, logits.shape[-1] - 1)
    top, idx = logits.topk(k, dim=-1)
    log_z = torch.logsumexp(logits, -1)
    kept_mass = torch.exp(torch.logsumexp(top, -1) - log_z).clamp(max=1 - 1e-7)
    tail = log_z + torch.log1p(-kept_mass) - torch.log(torch.tensor(float(logits.shape[-1] - k)))
    return top, idx.to(torch.int32), tail


def _modified(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of the file, None if there is none: tells whether it changed since it was read."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def cached_teacher(teacher, tokenizer, teacher_dir: str, tokenizer_dir: str, examples: list, *, cache_dir: Path,
                   dtype: str, fmt: str = "full", top_k: int = 64, needed: list | None = None, counter=None,
                   echo=print, packed: bool = True, scored=None, served=None, temperature: float = 1.0
                   ) -> TeacherCache:
    """The cache entry for these exact inputs, holding at least the `needed` examples (default: all).

    The entry is keyed by the whole training split but filled lazily: a run scores only the examples it
    will train on and the entry lacks, so a short run does not pay for the whole split, and the next
    cell or seed reuses what is there. Entries another job stored meanwhile are kept. `packed` as in
    TeacherCache.build (False: the teacher's own forward, as trainer.packed_forward=false asks); `counter` and
    `scored` as there (told only of the passes this call runs). `served` (a RemoteTeacher, checked; `teacher` is
    None): the server's top-k form at `temperature`, keyed by the model files the server reports, its k and the
    temperature (fmt and top_k are then unused).
    """
    # the tokenizer's end-of-response token is part of every encoded response (a chat template may set it)
    tokenizer_key = f"{source_fingerprint(tokenizer_dir)}:{tokenizer.eos_token_id}:{len(tokenizer)}"
    if served is not None:
        info = served.info
        teacher_key, dtype = f"served:{info.get('source') or info['model']}", str(info.get("dtype"))
        fmt, top_k = f"served@T{temperature!r}", served.top_k
    else:
        teacher_key = source_fingerprint(teacher_dir)
    key = CacheKey(teacher_key, tokenizer_key, examples_fingerprint(examples), dtype, fmt,
                   top_k if fmt == "topk" or served is not None else 0)
    path = Path(cache_dir) / f"teacher-{key.digest()}.pt"
    remove_stale_temporaries(cache_dir)  # what a writer killed half-way left (a writer still at work keeps its own)
    read = _modified(path)
    cache = None
    if read:
        try:
            cache = TeacherCache.load(path)
        except Exception as error:  # zero-length, torn or corrupt: rebuilt below, never trusted
            echo(f"warning: teacher cache {path} is unreadable ({type(error).__name__}); rebuilding it")
    wanted = list({entry_key(e): e for e in (examples if needed is None else needed)}.values())
    missing = [e for e in wanted if cache is None or entry_key(e) not in cache.index]
    if not missing:
        echo(f"teacher cache: hit {path} ({len(wanted)} examples)")
        return cache
    echo(f"teacher cache: adding {len(missing)} of {len(wanted)} examples to {path}")
    built = TeacherCache.build(teacher, tokenizer, missing, fmt=fmt, top_k=top_k, counter=counter, packed=packed,
                               scored=scored, served=served, temperature=temperature)
    cache = built if cache is None else cache.merged(built)
    if _modified(path) != read:  # a parallel job stored entries since we read the file: keep them
        try:
            cache = cache.merged(TeacherCache.load(path))
        except Exception:  # what the other job left is unreadable: ours replaces it
            pass
    cache.save(path)
    return cache
