"""Token embedding and LM head split by vocabulary rows over a tensor-parallel group."""

import torch
import torch.nn.functional as F
from torch import nn

from lightvlm.common.distributed import SINGLE, TPGroup


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of vocabulary rows; lookups outside it read zeros and the
    ranks' results are summed."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.rows_per_rank
        self.end = min(self.start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden_size))
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
        if tensor.shape[0] != self.vocab_size:
            raise ValueError(f"embedding has {tensor.shape[0]} rows, config says vocab_size={self.vocab_size}")
        param.data[: self.end - self.start].copy_(tensor[self.start : self.end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = torch.where(outside, 0, ids - self.start)
        out = F.embedding(local, self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h W^T over this rank's vocabulary rows, gathered into the full vocabulary."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[:, : self.vocab_size]
