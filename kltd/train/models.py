"""Loading teacher and student: the shipped toy pair, local directories and hub ids, one code path.

Any causal LM that transformers loads works (the Llama-family fast paths are only a speed-up). The two
models must share a tokenizer, compared by vocabulary (token -> id), not by file; their output layers may
have padded rows beyond it (Qwen2.5-7B has 152,064 rows, Qwen2.5-0.5B 151,936, for one tokenizer), so
logits are compared on the tokenizer's ids only (ModelPair.vocab_size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kltd.hub import cached_model_dir, hub_reachable, in_model_cache, why_offline

# the pairs shipped inside the package, by the name a config gives them: "toy/teacher" is kltd/assets/toy/teacher
SHIPPED = ("toy/", "markov/")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def assets_dir() -> Path:
    return Path(__file__).parents[1] / "assets"


def toy_dir() -> Path:
    return assets_dir() / "toy"


def markov_dir() -> Path:
    return assets_dir() / "markov"


def shipped(reference: str) -> bool:
    return reference.startswith(SHIPPED)


def resolve_model_path(reference: str) -> str:
    """'toy/teacher', 'markov/teacher' -> the directory shipped inside the package; a kltd run directory -> its
    trained student (checkpoint/, e.g. model.student=RUN_DIR for an RL stage alone); other references pass through."""
    if shipped(reference):
        return str(assets_dir() / reference)
    if not _looks_local(reference):
        return reference
    path = Path(reference).expanduser()
    return str(path / "checkpoint") if _is_run_directory(path) else str(path)


def _is_run_directory(path: Path) -> bool:
    """A run's directory (its summary, no model files of its own), not a model directory."""
    return (path / "metrics.json").is_file() and not (path / "config.json").is_file()


def model_directory(reference: str) -> Path | None:
    """A model's local directory: as given, the shipped toy's, or a hub model's cached snapshot."""
    path = Path(resolve_model_path(reference))
    if (path / "config.json").is_file():
        return path
    cached = None if _looks_local(reference) else cached_model_dir(reference)
    return Path(cached) if cached else None


def _looks_local(reference: str) -> bool:
    return reference.startswith((".", "/", "~")) or Path(reference).expanduser().exists()


def check_model_reference(reference: str) -> str | None:
    """Why a model reference cannot be loaded, checked cheaply before any weights are read."""
    path = resolve_model_path(reference)
    if shipped(reference) or _looks_local(reference):
        p = Path(path)
        if p.name == "checkpoint" and _is_run_directory(p.parent) and not p.is_dir():
            if (p.parent / "adapter").is_dir():  # a LoRA run keeps its adapter; the merged model only on request
                return (f"'{reference}' is a LoRA run without a merged student (checkpoint/): it kept only its adapter "
                        "(adapter/); rerun it with model.lora.save_merged=true, or load adapter/ with peft")
            return (f"'{reference}' is a run directory without a trained student (checkpoint/): the run did not "
                    "finish, or ran with trainer.save_checkpoint=false")
        if not p.is_dir():
            hint = (" (the shipped pairs are toy/teacher and toy/student, markov/teacher and markov/student)"
                    if shipped(reference) else "")
            return f"model directory '{path}' does not exist{hint}"
        if not (p / "config.json").is_file():
            return f"'{path}' has no config.json: not a Hugging Face model directory"
        return None
    if not in_model_cache(reference) and not hub_reachable():
        return (f"'{reference}' is not a local directory nor in the Hugging Face cache, and {why_offline()}; "
                f"download it first (hf download {reference}) or give a local directory")
    return None


def _local_only(path: str) -> bool:
    # directories never reach for the network; hub names only while the hub can be reached
    return _looks_local(path) or not hub_reachable()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ModelPair:
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    device: torch.device  # the student's (where the loss is formed)
    vocab_size: int = 0  # the shared tokenizer's ids: logits are compared on these only
    adapter: object = None  # a LoRA student's peft wrapper (kltd.train.lora), whose model `student` is; else None
    # a teacher served by another process (kltd.rollout.remote_teacher.RemoteTeacher; `teacher` is then None)
    remote_teacher: object = None


def _quiet_transformers() -> None:
    """No per-load progress bars: a sweep loads two models per job."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_model(reference: str, dtype: str = "float32", device: str | torch.device = "cpu",
               trust_remote_code: bool = False):
    """A causal LM in evaluation-ready form. trust_remote_code stays off unless the config turns it on: a
    model repository's own Python code runs only when asked for."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    path = resolve_model_path(reference)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=_local_only(path),
                                                     trust_remote_code=trust_remote_code)
    except Exception as error:  # name the file that is broken, not a stack of loader internals
        raise ValueError(f"cannot load the model '{reference}': {_load_problem(path, error)}") from None
    return model.to(device)


def _load_problem(path: str, error: Exception) -> str:
    """A truncated or corrupt file in a model directory, named; else the loader's own first line."""
    directory = Path(path)
    if directory.is_dir():
        from safetensors import safe_open

        for weights in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(str(weights), framework="pt") as f:
                    for name in f.keys():
                        f.get_slice(name)  # the header promises these bytes: are they there?
            except Exception:
                return f"'{weights}' is truncated or corrupt; copy or download it again"
        for config in sorted(directory.glob("*.json")):
            try:
                json.loads(config.read_text())
            except (ValueError, UnicodeDecodeError):
                return f"'{config}' is not valid JSON; copy or download it again"
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


def load_tokenizer(reference: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(reference)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=_local_only(path),
                                              trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def enable_checkpointing(model) -> None:
    """Recompute activations in backward (transformers 5 names it activation checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_tokenizers(teacher: str, student: str, tokenizer=None, trust_remote_code: bool = False):
    """The student's tokenizer, after checking the teacher's has the same vocabulary (token -> id)."""
    tokenizer = tokenizer or load_tokenizer(student, trust_remote_code)
    teacher_vocab, student_vocab = load_tokenizer(teacher, trust_remote_code).get_vocab(), tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differ = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])[:3]
        raise ValueError(f"teacher '{teacher}' and student '{student}' use different tokenizers "
                         f"({len(teacher_vocab)} vs {len(student_vocab)} tokens; e.g. {differ}); kltd compares "
                         "next-token distributions token by token, so they need one vocabulary")
    return tokenizer


def output_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def load_pair(teacher: str, student: str, dtype: str = "float32", device: str = "auto", *, tokenizer=None,
              teacher_device: str | None = None, gradient_checkpointing: bool = False,
              trust_remote_code: bool = False, lora=None, remote_teacher=None) -> ModelPair:
    """Teacher frozen in eval mode (on `teacher_device` if given), student in train mode; both share the
    student's tokenizer (pass it if already loaded: kltd.data may have set its end-of-response token).
    `lora` (kltd.schema.config.LoraSettings) with r > 0: the student carries a LoRA adapter, the only part that
    trains (kltd.train.lora), its base in 4 bits with quantize_base=4bit. `remote_teacher`
    (kltd.rollout.remote_teacher.RemoteTeacher, checked already): no teacher is loaded, the pair's is None."""
    dev = pick_device(device)
    if remote_teacher is None:
        tokenizer = check_tokenizers(teacher, student, tokenizer, trust_remote_code)
        teacher_model = load_model(teacher, dtype, pick_device(teacher_device) if teacher_device else dev,
                                   trust_remote_code)
        teacher_model = teacher_model.eval().requires_grad_(False)
    else:  # the server holds the teacher; its tokenizer was checked against the student's (RemoteTeacher.check)
        tokenizer = tokenizer or load_tokenizer(student, trust_remote_code)
        teacher_model = None
    adapted = lora is not None and lora.enabled
    if adapted and lora.quantize_base == "4bit":
        from kltd.train.lora import load_quantized

        path = resolve_model_path(student)
        try:
            student_model = load_quantized(path, DTYPES[dtype], dev, _local_only(path), trust_remote_code).train()
        except Exception as error:  # as load_model: the broken file or the loader's first line (bitsandbytes missing)
            raise ValueError(f"cannot load the model '{student}' in 4 bits: {_load_problem(path, error)}") from None
    else:
        student_model = load_model(student, dtype, dev, trust_remote_code).train()
    if gradient_checkpointing:
        enable_checkpointing(student_model)
    adapter = None
    if adapted:  # after checkpointing is set: peft keeps the model's own forward
        from kltd.train.lora import wrap

        adapter = wrap(student_model, lora)
    vocab = len(tokenizer)
    for role, model in (("teacher", teacher_model), ("student", student_model)):
        if model is not None and output_rows(model) < vocab:
            raise ValueError(f"the {role}'s output layer has {output_rows(model)} rows but its tokenizer "
                             f"{vocab} tokens: the model cannot predict every token")
    return ModelPair(teacher_model, student_model, tokenizer, dev, vocab, adapter, remote_teacher)
