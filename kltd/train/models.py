"""Loading teacher and student: the shipped toy pair, local directories and hub ids, one code path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TOY_PREFIX = "toy/"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def toy_dir() -> Path:
    return Path(__file__).parents[1] / "assets" / "toy"


def resolve_model_path(reference: str) -> str:
    """'toy/teacher' -> the directory shipped inside the package; other references pass through."""
    if reference.startswith(TOY_PREFIX):
        return str(toy_dir() / reference[len(TOY_PREFIX) :])
    return str(Path(reference).expanduser()) if _looks_local(reference) else reference


def _looks_local(reference: str) -> bool:
    return reference.startswith((".", "/", "~")) or Path(reference).expanduser().exists()


def check_model_reference(reference: str) -> str | None:
    """Why a model reference cannot be loaded, checked cheaply before any weights are read."""
    path = resolve_model_path(reference)
    if reference.startswith(TOY_PREFIX) or _looks_local(reference):
        p = Path(path)
        if not p.is_dir():
            hint = " (the shipped pair is toy/teacher and toy/student)" if reference.startswith(TOY_PREFIX) else ""
            return f"model directory '{path}' does not exist{hint}"
        if not (p / "config.json").is_file():
            return f"'{path}' has no config.json: not a Hugging Face model directory"
    return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ModelPair:
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    device: torch.device


def _quiet_transformers() -> None:
    """No per-load progress bars: a sweep loads two models per job."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_model(reference: str, dtype: str = "float32", device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    path = resolve_model_path(reference)
    # local_files_only for directories so that nothing ever reaches for the network by accident
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=_looks_local(path))
    return model.to(device)


def load_tokenizer(reference: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(reference)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=_looks_local(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pair(teacher: str, student: str, dtype: str = "float32", device: str = "auto") -> ModelPair:
    """Teacher frozen in eval mode, student in train mode; both share the student's tokenizer."""
    dev = pick_device(device)
    tokenizer = load_tokenizer(student)
    teacher_tok = load_tokenizer(teacher)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"teacher '{teacher}' and student '{student}' use different tokenizers; "
            "kltd needs a shared vocabulary to compare next-token distributions"
        )
    teacher_model = load_model(teacher, dtype, dev).eval().requires_grad_(False)
    student_model = load_model(student, dtype, dev).train()
    return ModelPair(teacher_model, student_model, tokenizer, dev)
