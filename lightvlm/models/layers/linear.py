"""Linear layers split over a tensor-parallel group, each knowing how to load its checkpoint shard.

Every parameter carries a `weight_loader(param, tensor, shard_id)` that copies this rank's slice of a
full checkpoint tensor into it. Fused layers (QKV, gate+up) load their parts one checkpoint tensor at a
time, named by `shard_id`, and list the parts they need in `param.required_shards`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup, divide, kv_heads_per_rank


def _attach_loader(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader
    return param


def copy_full(param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
    """Loader for replicated parameters: the checkpoint tensor is the parameter."""
    if param.shape != tensor.shape:
        raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
    param.data.copy_(tensor)


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = _attach_loader(nn.Parameter(torch.empty(out_features, in_features)), copy_full)
        self.bias = _attach_loader(nn.Parameter(torch.empty(out_features)), copy_full) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over the ranks; each rank returns its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.out_per_rank = divide(out_features, tp.size, "output features")
        self.weight = _attach_loader(nn.Parameter(torch.empty(self.out_per_rank, in_features)), self._load)
        self.bias = _attach_loader(nn.Parameter(torch.empty(self.out_per_rank)), self._load) if bias else None

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        start = self.tp.rank * self.out_per_rank
        copy_full(param, tensor.narrow(0, start, self.out_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate+up). `shard_id` is the part's index."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = True, tp: TPGroup = SINGLE):
        super().__init__(in_features, sum(out_sizes), bias, tp)
        self.part_sizes = [divide(n, tp.size, "output features") for n in out_sizes]
        for param in self.parameters():
            param.required_shards = set(range(len(out_sizes)))

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        size = self.part_sizes[shard_id]
        offset = sum(self.part_sizes[:shard_id])
        param.data.narrow(0, offset, size).copy_(tensor.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, split by heads.

    When there are fewer KV heads than ranks, each KV head is replicated on `tp.size / num_kv_heads`
    ranks, so every rank still holds whole heads.
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup = SINGLE):
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "number of attention heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)  # ranks sharing one KV head
        out_per_rank = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, out_per_rank * tp.size, bias, tp)
        for param in self.parameters():
            param.required_shards = {"q", "k", "v"}

    @property
    def sizes(self) -> tuple[int, int, int]:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return q, kv, kv

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        q_size, kv_size, _ = self.sizes
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp.rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp.rank // self.kv_replicas) * kv_size
        param.data.narrow(0, offset, size).copy_(tensor.narrow(0, start, size))


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over the ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.in_per_rank = divide(in_features, tp.size, "input features")
        self.weight = _attach_loader(nn.Parameter(torch.empty(out_features, self.in_per_rank)), self._load)
        self.bias = _attach_loader(nn.Parameter(torch.empty(out_features)), copy_full) if bias else None

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        copy_full(param, tensor.narrow(1, self.tp.rank * self.in_per_rank, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class FusedQKVParallelLinear(QKVParallelLinear):
    """QKVParallelLinear for checkpoints that store q, k and v as one tensor (`qkv`, [q; k; v] rows), as
    many vision towers do: the fused tensor is split and each part loaded as its own shard."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup = SINGLE):
        super().__init__(hidden, head_dim, num_heads, num_kv_heads, bias, tp)
        self.full_sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        for param in self.parameters():
            param.weight_loader = self._load_fused
            param.required_shards = {None}

    def _load_fused(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        if tensor.shape[0] != sum(self.full_sizes):
            raise ValueError(f"fused qkv has {tensor.shape[0]} rows, expected {sum(self.full_sizes)}")
        for part, chunk in zip("qkv", tensor.split(self.full_sizes, dim=0)):
            self._load(param, chunk, part)
