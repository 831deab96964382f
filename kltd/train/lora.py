"""A LoRA student (model.lora.r > 0): the loaded student wrapped by peft, trained through its adapter only.

peft replaces each targeted linear layer of the student in place by one that adds (alpha / r) B A x to the frozen
layer's output, so the student object the trainer holds is still the transformers model, its forward now the
adapted one; peft's wrapper (`PeftModel`) is kept beside it to save and load the adapter in peft's format. Only the
adapter's parameters require gradients, so the optimiser holds only them. kltd's fast paths read plain weights and
do not see an adapter: the execution plan runs such a student through its own forward (kltd.rollout.plan).

Merged weights (each adapted W replaced by W + (alpha / r) B A, in the plain model's names) serve the merged
checkpoint and a vLLM engine, which knows nothing of the adapter. They are computed beside the live model, never
by merging it in place: merging and unmerging again would round the frozen weights.

peft is optional (the lora extra) and imported only here, only for a LoRA student.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

MISSING = "model.lora.r > 0 needs peft: pip install -e '.[lora]' (or pip install peft), or set model.lora.r=0"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names in an adapter directory
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter


def peft_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is None


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError(MISSING) from error
    return peft


def wrap(model: torch.nn.Module, settings):
    """peft's LoRA wrapper around `model` (changed in place: its targeted layers carry the adapter, everything else
    is frozen). `settings`: kltd.schema.config.LoraSettings. A target that names no module of the model is one line."""
    peft = _peft()
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks the model a deprecated question about checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            return peft.get_peft_model(model, config)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"model.lora.target_modules={list(settings.target_modules)}: "
                         f"{str(error).strip().splitlines()[0][:200]}; the student's linear layers are named "
                         f"{', '.join(names)}") from None


def load_quantized(path: str, dtype: torch.dtype, device: torch.device, local_only: bool, trust_remote_code: bool):
    """The student's frozen base in 4 bits (NF4, computing in `dtype`) on `device`, for an adapter (QLoRA). Needs
    CUDA and bitsandbytes (kltd.train.preflight refuses otherwise before any model loads). Untested: this project's
    machine has no GPU.

    Its other weights (embeddings, norms, the output layer) stay in `dtype`, as in any run of that dtype: peft's
    prepare_model_for_kbit_training would cast them to float32 and leave the output layer in another dtype than the
    hidden states the fused head multiplies it with (activation checkpointing without reentrancy needs none of it)."""
    _peft()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                device_map={"": str(device)}, local_files_only=local_only,
                                                trust_remote_code=trust_remote_code)


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the plain model that computes what `model` (adapted in place by peft) computes: each adapted
    layer's weight is W + (alpha / r) B A, under the name the model has without the adapter; no adapter tensors; a
    tied weight once. Detached, on the model's device; the live model is unchanged."""
    peft = _peft()
    merged, adapted = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            base = module.get_base_layer()
            delta = module.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype)
            adapted[name] = (base.weight.detach() + delta.detach(), None if base.bias is None else base.bias.detach())
    first_names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    for key, tensor in model.state_dict().items():
        if key not in first_names or ".lora_" in key:
            continue
        owner, _, leaf = key.rpartition(".base_layer.")
        if owner in adapted and leaf in ("weight", "bias"):
            merged[f"{owner}.{leaf}"] = adapted[owner][0 if leaf == "weight" else 1]
        else:
            merged[key] = tensor.detach()
    return merged


def save_adapter(wrapper, directory: Path) -> None:
    """The adapter in peft's format (adapter_config.json, adapter_model.safetensors): PeftModel.from_pretrained(base,
    directory) loads it."""
    wrapper.save_pretrained(str(directory), safe_serialization=True)


def load_adapter(wrapper, directory: Path) -> None:
    """Put a saved adapter's weights (save_adapter) into the live wrapper's adapter, exactly."""
    from safetensors.torch import load_file

    peft = _peft()
    weights = load_file(str(Path(directory) / ADAPTER_WEIGHTS), device=str(next(wrapper.parameters()).device))
    result = peft.set_peft_model_state_dict(wrapper, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{directory} holds adapter weights this student does not have: {unexpected[:3]}")
