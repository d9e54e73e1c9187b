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


# Fused q/k/v layouts of checkpoints (shard id -> how the rows are ordered):
#   qkv_concatenated: [all q heads; all k heads; all v heads] (InternViT's attn.qkv)
#   qkv_grouped: for each KV head, its query heads, its key head, its value head (InternLM2's wqkv)
PACKED_QKV = ("qkv_concatenated", "qkv_grouped")


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, split by heads.

    When there are fewer KV heads than ranks, each KV head is replicated on `tp.size / num_kv_heads`
    ranks, so every rank still holds whole heads.

    Checkpoints give q, k and v as three tensors (shard ids "q", "k", "v") or as one fused tensor, which
    is unpacked into the three before this rank takes its slice (shard ids in PACKED_QKV).
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup = SINGLE):
        self.head_dim = head_dim
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
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

    def unpack(self, tensor: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fused checkpoint tensor (weight [rows, hidden] or bias [rows]) -> the full q, k and v."""
        d, heads, kv = self.head_dim, self.total_heads, self.total_kv_heads
        rows, rest = (heads + 2 * kv) * d, tuple(tensor.shape[1:])
        if tensor.shape[0] != rows:
            raise ValueError(f"shape mismatch: fused qkv has {tensor.shape[0]} rows, the model needs "
                             f"({heads} + 2 x {kv} heads) x {d} = {rows}")
        if layout == "qkv_concatenated":
            return tuple(tensor.split([heads * d, kv * d, kv * d]))
        # grouped: per KV head, its `groups` query heads, then its key head, then its value head
        groups = heads // kv
        grouped = tensor.reshape(kv, groups + 2, d, *rest)
        return (grouped[:, :groups].reshape(heads * d, *rest), grouped[:, groups].reshape(kv * d, *rest),
                grouped[:, groups + 1].reshape(kv * d, *rest))

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        if shard_id in PACKED_QKV:
            for part, piece in zip("qkv", self.unpack(tensor, shard_id)):
                self._load(param, piece, part)
            return
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
