"""Tensor-parallel groups: who am I, how many of us, and the collectives the layers and runner need.

Layers receive a `TPGroup` in their constructor instead of reading a global, so the same process can
hold an unsharded model (the offline pipeline, tp=1) next to nothing else, and the vision encoder and
the language model can be split over different groups.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when size > 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank."""
        if self.size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


SINGLE = TPGroup()


def init_tp_group(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    """Joins the default process group (gloo on CPU, NCCL on CUDA) and returns this rank's view."""
    if size == 1:
        return SINGLE
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    return TPGroup(rank=rank, size=size, group=dist.group.WORLD)


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: a share of them, or one replicated head when there are fewer than ranks."""
    if num_kv_heads >= tp_size:
        return divide(num_kv_heads, tp_size, "number of key/value heads")
    divide(tp_size, num_kv_heads, "tensor-parallel size over key/value heads")
    return 1


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
