"""Batched sampling on the device: one [B, vocab] logits tensor in, one token per row out.

Order (as vLLM and transformers apply them): the per-request masks (allowed_token_ids, the output
grammar's token mask, bad words and min-tokens), logit_bias, penalties, then for sampling rows
temperature, top-k and top-p (the `top_k_top_p` op: a Triton kernel on CUDA, its torch twin on the
CPU) and min-p, then a draw. Masks and biases touch only the rows that have
them. Greedy rows take the argmax of the penalized logits.
Rows with a seed draw their randomness from their own generator, so the same seed and request give
the same tokens whatever else shares the batch.

Penalty semantics: repetition_penalty as transformers' RepetitionPenaltyLogitsProcessor (over prompt
and output tokens); presence/frequency penalties as OpenAI and vLLM define them (over output tokens).
"""

import sys
from dataclasses import dataclass

import torch

from lightvlm.common.triton_kernels.ops import ops_for

NEG_INF = float("-inf")
BIT_POSITIONS = torch.arange(32, dtype=torch.int32)
BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # byte -> its 8 bits, lowest first


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors; built by the model runner for each step."""

    temperature: torch.Tensor  # [B] float; rows with is_greedy ignore it
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long; vocab size when off
    min_p: torch.Tensor  # [B] float
    is_greedy: torch.Tensor  # [B] bool
    generators: list[torch.Generator | None]  # per row; None draws from the global RNG
    repetition_penalty: torch.Tensor | None = None  # [B] float, when any row uses penalties
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    seen_mask: torch.Tensor | None = None  # [B, V] bool: token in prompt or output
    output_counts: torch.Tensor | None = None  # [B, V] float: times generated so far
    banned: torch.Tensor | None = None  # [B, V] bool: tokens masked out (EOS before min_new_tokens, bad words)
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [n], allowed [n, V] bool)
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [n], token bitmask [n, ceil(V/32)] int32)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, ids, values) added to logits
    top_logprobs: int = 0  # return this many alternatives per row (0: none)
    needs_logprobs: bool = False

    @property
    def all_greedy(self) -> bool:
        return bool(self.is_greedy.all())


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Seen tokens: positive logits divided by the penalty, negative ones multiplied by it."""
    penalty = penalty[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (keep >= 1)."""
    if bool((min_p <= 0).all()):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    remove = probs < threshold
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def unpack_bitmask(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Token bitmask [n, words] int32 (bit j of word w allows id 32 w + j) -> allowed [n, vocab] bool.
    Ids past the mask's width are not allowed. Read a byte at a time through a 256-entry table: on the
    CPU that is 10-100x faster than shifting every word 32 times (int32 words are little-endian there)."""
    table = BYTE_BITS.to(bits.device)
    if sys.byteorder == "little":
        allowed = torch.nn.functional.embedding(bits.contiguous().view(torch.uint8).int(), table)
    else:
        allowed = ((bits.unsqueeze(-1) >> BIT_POSITIONS.to(bits.device)) & 1).bool()
    allowed = allowed.view(bits.shape[0], -1)[:, :vocab]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return allowed


def mask_rows(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits of `rows` (distinct, increasing) outside `allowed` ([len(rows), V] bool) become -inf; other
    rows are untouched."""
    if len(rows) == logits.shape[0]:  # every row: no gather and scatter
        return torch.where(allowed, logits, NEG_INF)
    return logits.index_put((rows,), torch.where(allowed, logits[rows], NEG_INF))


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Everything that changes logits before the draw: masks, biases, penalties, temperature, top-k/p, min-p."""
    if batch.allowed is not None:
        logits = mask_rows(logits, *batch.allowed)
    if batch.grammar is not None:
        rows, bits = batch.grammar
        logits = mask_rows(logits, rows, unpack_bitmask(bits.to(logits.device), logits.shape[-1]))
    if batch.banned is not None:
        logits = logits.masked_fill(batch.banned, NEG_INF)
    if batch.bias is not None:
        rows, ids, values = batch.bias
        logits = logits.index_put((rows, ids), values, accumulate=True)
    if batch.repetition_penalty is not None:
        logits = apply_repetition_penalty(logits, batch.seen_mask, batch.repetition_penalty)
        logits = apply_presence_frequency(logits, batch.output_counts, batch.presence_penalty,
                                          batch.frequency_penalty)
    if batch.all_greedy:
        return logits
    temperature = torch.where(batch.is_greedy, 1.0, batch.temperature)
    logits = logits / temperature[:, None]
    logits = ops_for(logits.device).top_k_top_p(logits, batch.top_k, batch.top_p)
    return apply_min_p(logits, batch.min_p)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample one token per row: argmax(p / q) with q ~ Exp(1) is a draw from p (the exponential race)."""
    q = torch.empty_like(probs)
    if any(g is not None for g in generators):
        for row, generator in enumerate(generators):
            q[row].exponential_(generator=generator)
    else:
        q.exponential_()
    return (probs / q).argmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch):
    """logits [B, V] fp32 -> (tokens [B] long, logprobs [B] or None, top (ids, logprobs) or None).

    Logprobs are those of the model's raw distribution (log-softmax of `logits`) for the chosen token.
    """
    processed = process_logits(logits, batch)
    greedy_tokens = processed.argmax(dim=-1)
    if batch.all_greedy:
        tokens = greedy_tokens
    else:
        sampled = draw(processed.softmax(dim=-1), batch.generators)
        tokens = torch.where(batch.is_greedy, greedy_tokens, sampled)
    if not batch.needs_logprobs:
        return tokens, None, None
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    top = torch.topk(logprobs, batch.top_logprobs, dim=-1) if batch.top_logprobs else None
    return tokens, chosen, top
