"""Normalization layers. RMSNorm computes in fp32 and scales in the input dtype, as the HF models do
(through the `rmsnorm` op: a Triton kernel on CUDA, its torch twin on the CPU)."""

import torch
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.common.triton_kernels.ops import ops_for
from lightvlm.models.layers.linear import copy_full


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.weight.weight_loader = copy_full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops_for(x.device).rmsnorm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass over the residual stream."""
        return ops_for(x.device).fused_add_rmsnorm(x, residual, self.weight, self.eps)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector whose features are split across the ranks (InternViT's qk-norm under TP).

    Each rank holds `hidden_size / tp.size` features and the matching slice of the weight; the mean
    square is summed over all ranks so the result equals the unsharded norm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, tp: TPGroup = SINGLE):
        super().__init__()
        self.eps, self.tp, self.hidden_size = eps, tp, hidden_size
        self.per_rank = hidden_size // tp.size
        self.weight = nn.Parameter(torch.ones(self.per_rank))
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        copy_full(param, tensor.narrow(0, self.tp.rank * self.per_rank, self.per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.tp.size == 1:
            variance = x.pow(2).mean(-1, keepdim=True)
        else:
            variance = self.tp.all_reduce(x.pow(2).sum(-1, keepdim=True)) / self.hidden_size
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.LayerNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps)
        self.weight.weight_loader = copy_full
        self.bias.weight_loader = copy_full


def make_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    if kind == "layer_norm":
        return LayerNorm(hidden_size, eps)
    if kind == "rms_norm":
        return RMSNorm(hidden_size, eps)
    raise ValueError(f"unknown norm type {kind!r}; expected 'layer_norm' or 'rms_norm'")
