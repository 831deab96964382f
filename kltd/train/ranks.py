"""The processes of a data-parallel run and the few collectives the trainer needs (torch.distributed).

Every process holds the whole student and draws the same global batch from the data order; process r takes
its share of the rows (kltd.rollout.noise keys each row's draws by its place in the global batch), the
loss is divided by the global token or sequence count, and the gradients are summed across processes
before the optimiser step. N processes with B/N rows each therefore take the step one process takes with
B rows. The gradients are summed by hand rather than by DistributedDataParallel's hooks: the fast path
scores with the student's weights directly (kltd.fast), without the module call that DDP's bookkeeping
runs on, and summing once after the last micro-batch is what DDP's no_sync does under accumulation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kltd.train.sharding import is_shard


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The process that evaluates, logs, checkpoints and writes the run directory."""
        return self.rank == 0

    def share(self, rows: int) -> range:
        """This process's rows of a global batch of `rows` (a multiple of the world size)."""
        per = rows // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def agree(self, value: float) -> bool:
        """Whether every process holds the same `value` (every process gets the same answer)."""
        if self.world == 1:
            return True
        import torch.distributed as dist

        extremes = torch.tensor([value, -value], dtype=torch.float64)  # the largest value and minus the smallest
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        return bool(extremes[0] == -extremes[1])

    def any(self, flag: bool) -> bool:
        return bool(self.sum([float(flag)])[0] > 0) if self.world > 1 else flag

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """[b, ...] in every process (the same b) -> [world * b, ...]: every process's rows in global order."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        parts = [torch.empty_like(values) for _ in range(self.world)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def sum_positions(self, table: torch.Tensor) -> torch.Tensor:
        """[k, T] per-position sums over this process's rows -> the same sums over every process's rows (T,
        the local response width, may differ between processes; positions past it are not returned)."""
        if self.world == 1:
            return table
        import torch.distributed as dist

        width = torch.tensor([table.shape[1]], device=table.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        padded = torch.nn.functional.pad(table, (0, int(width) - table.shape[1]))
        dist.all_reduce(padded)
        return padded[:, : table.shape[1]]

    def sum_gradients(self, parameters) -> None:
        """Each parameter's gradient becomes the sum over processes (a missing gradient counts as zeros)."""
        if self.world == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        # a sharded parameter's gradient was reduced by FSDP already (kltd.train.sharding)
        params = [p for p in parameters if p.requires_grad and not is_shard(p)]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_type: dict = {}
        for p in params:  # one flat buffer per dtype and device: one message each
            by_type.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_type.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Every process starts from process 0's weights (a sharded model's shards differ by design)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                if is_shard(tensor):
                    continue
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block first (e.g. fills a shared cache), then the others (e.g. read it)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


SINGLE = Ranks()
