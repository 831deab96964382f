"""A student sharded across the processes of a run (distributed.strategy=fsdp): torch's FSDP2, fully_shard.

Each decoder layer, then the whole model, is sharded, so every process holds 1/N of the student's weights,
gradients and optimiser state, and a layer's weights are gathered only while it runs. The loss is already
divided by the global token (or sequence) count (kltd.train.trainer), so the gradients are summed across
processes, not averaged. A sharded model runs through its own forward only (kltd.fast.arranged.is_sharded).

Checkpoints hold whole tensors in the layout of a one-process run (gathered here, written by process 0),
so a run saved sharded resumes in one process, with DDP or on another process count, and back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kltd.rollout.grad_free import is_sharded as sharded  # the module test; its parameters may be gathered


def shard(model: torch.nn.Module) -> None:
    """Shard `model` in place across the default process group: each of its decoder layers, then the rest."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    for module in model.modules():
        if sharded(module):  # each sharded group reduces its own gradients
            module.set_gradient_divide_factor(1.0)  # sum: each process's loss is its share of the global mean
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum


def is_shard(tensor) -> bool:
    """A DTensor: one process's part of a sharded parameter or of its gradient or optimiser state. (Nothing is
    one before torch's DTensor module is imported, which costs seconds, so it is looked up, not imported.)"""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def whole(tensor):
    """A shard gathered into the whole tensor (every process takes part); any other value as it is."""
    return tensor.full_tensor() if is_shard(tensor) else tensor


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each sharded tensor whole: the layout of a one-process run. Collective
    when the parameters are sharded (every process calls it)."""
    state = optimizer.state_dict()
    state["state"] = {index: {k: whole(v) for k, v in entry.items()} for index, entry in state["state"].items()}
    return state


def scattered_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of gathered_optimizer_state: whole tensors cut into the shards of the parameters they
    belong to (unchanged for parameters that are not sharded)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    scattered = {}
    for index, entry in state["state"].items():
        p = params[int(index)]
        scattered[index] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
            if is_shard(p) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for k, v in entry.items()
        }
    return {**state, "state": scattered}


def whole_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as whole tensors on the CPU, a tied weight once (under its first name, as
    named_parameters gives it). Collective when the model is sharded."""
    if sharded(model):
        model.reshard()  # the root's weights stay gathered after a forward without backward (evaluation)
    first_names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: whole(tensor).detach().cpu().contiguous() for name, tensor in model.state_dict().items()
            if name in first_names}


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(path), metadata={"format": "pt"})  # the header Hugging Face's loader expects


def load_weights(model: torch.nn.Module, path: Path, device) -> None:
    """Load a weights file written by save_weights (or safetensors' save_model) into a sharded or plain model."""
    from safetensors.torch import load_file

    saved = load_file(str(path), device=str(device))
    if sharded(model):
        model.reshard()
    own = model.state_dict()
    missing = [name for name in own if name not in saved]
    unexpected = [name for name in saved if name not in own]
    if unexpected:
        raise RuntimeError(f"{path} holds weights this model does not have: {unexpected[:3]}")
    # a weight missing from the file must be tied to one that is there (the file keeps tied weights once)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in saved if name in params}
    untied = [name for name in missing if name not in params or id(params[name]) not in loaded]
    if untied:
        raise RuntimeError(f"{path} lacks weights of this model: {untied[:3]}")
    with torch.no_grad():
        for name, target in own.items():
            if name in saved:
                _copy_into(target, saved[name])


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    if is_shard(target):  # this process's shard of the whole tensor
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements).to_local()
        target = target.to_local()
    target.copy_(value)
