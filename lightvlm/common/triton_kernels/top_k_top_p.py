"""Top-k then top-p filtering of logits with per-row parameters, without sorting the vocabulary.

    filtered = top_k_top_p(logits, top_k, top_p)

logits: [B, V] fp32 (rows contiguous); top_k: [B] integer (V or more: off; clamped to >= 1); top_p:
[B] float (1: off). Returns the logits with the filtered-out tokens set to -inf (a new tensor, or
`logits` itself when no row filters), as transformers' TopK and TopP logits warpers do per row:
- top-k keeps the tokens whose logit is >= the k-th largest (ties at the boundary stay);
- top-p then drops the least likely tokens while their cumulative probability (of the softmax of the
  top-k result, summed from the least likely up) stays <= 1 - top_p, and always keeps the most
  likely one. As in the sampler, once any row has top_p < 1 this rule runs on every row (a row with
  top_p = 1 then loses only the tokens whose probability is exactly 0).

Torch sorts each row; the kernel finds each row's two thresholds by bisection instead, one program
per row: a 16-way search over the 2^32 fp32 values in their order (the float's bits made monotone as
an int32), so that 8 counting passes over the row give the k-th largest logit exactly, and 9 passes
of probability mass the top-p cut (plus one for the maximum, one for the softmax's sum, one to write).
Where the two may differ: tokens tied (equal logits) at the top-p cut, which the kernel keeps or
drops together while torch's sort order splits them; and a cumulative sum within rounding (~1e-7) of
1 - top_p, which the two sum in a different order.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None

NEG_INF = float("-inf")


def top_k_top_p_torch(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The torch twin (the sampler's filters on the CPU): top-k by torch.topk, then top-p by a sort, a
    softmax and a cumulative sum."""
    vocab = logits.shape[-1]
    if not bool((top_k >= vocab).all()):
        k = top_k.clamp(1, vocab)
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if bool((top_p >= 1).all()):
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


if triton is not None:

    @triton.jit
    def _ordered_key(x):
        """fp32 -> int64 in the same order (-0.0 taken as +0.0, as the float comparison does)."""
        bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)

    @triton.jit
    def _candidates(lo, hi, RADIX: tl.constexpr):
        """RADIX keys spread evenly over [lo, hi], the first being lo."""
        return lo + tl.arange(0, RADIX).to(tl.int64) * (hi - lo + 1) // RADIX

    @triton.jit
    def _narrow(lo, hi, is_met, RADIX: tl.constexpr):
        """One step of a RADIX-ary search for the largest key meeting a condition that holds for a
        prefix of [lo, hi] (lo meets it): the candidates `_candidates(lo, hi)`, of which is_met says
        which meet it, give the next [lo, hi], RADIX times narrower."""
        i = tl.arange(0, RADIX)
        candidates = _candidates(lo, hi, RADIX)
        best = tl.maximum(tl.sum(is_met.to(tl.int32), axis=0) - 1, 0)
        new_lo = tl.sum(tl.where(i == best, candidates, 0), axis=0)
        new_hi = tl.where(best == RADIX - 1, hi, tl.sum(tl.where(i == best + 1, candidates, 0), axis=0) - 1)
        return new_lo, new_hi

    @triton.jit
    def _top_k_top_p_kernel(logits_ptr, top_k_ptr, top_p_ptr, out_ptr, stride_l, stride_o, VOCAB: tl.constexpr,
                            BLOCK: tl.constexpr, RADIX: tl.constexpr, APPLY_TOP_K: tl.constexpr,
                            APPLY_TOP_P: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row * stride_l
        lowest_key = -2147483648  # the smallest int32: every key is >= it
        kth_key = tl.full([], lowest_key, tl.int64)
        if APPLY_TOP_K:
            k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row), 1), VOCAB)
            # the largest key K with count(key >= K) >= k is the k-th largest logit's; k = V keeps all
            hi = tl.full([], 2147483647, tl.int64)
            for _ in range(tl.where(k < VOCAB, 8, 0)):  # 2^32 keys, 16 times fewer each pass
                candidates = _candidates(kth_key, hi, RADIX)
                counts = tl.zeros([RADIX], tl.int32)
                for start in range(0, VOCAB, BLOCK):
                    v = start + tl.arange(0, BLOCK)
                    x = tl.load(row_ptr + v, mask=v < VOCAB, other=float("-inf"))
                    is_above = (_ordered_key(x)[None, :] >= candidates[:, None]) & (v < VOCAB)[None, :]
                    counts += tl.sum(is_above.to(tl.int32), axis=1)
                kth_key, hi = _narrow(kth_key, hi, counts >= k, RADIX)
        cut_key = tl.full([], lowest_key, tl.int64) - 1  # top-p drops keys <= cut_key: none yet
        max_key = tl.full([], 2147483647, tl.int64)
        if APPLY_TOP_P:
            row_max = tl.full([], float("-inf"), tl.float32)
            for start in range(0, VOCAB, BLOCK):
                v = start + tl.arange(0, BLOCK)
                row_max = tl.maximum(row_max, tl.max(tl.load(row_ptr + v, mask=v < VOCAB, other=float("-inf"))))
            max_key = _ordered_key(row_max)  # never below kth_key: the top-k keeps the maximum
            total = tl.zeros([], tl.float32)
            for start in range(0, VOCAB, BLOCK):
                v = start + tl.arange(0, BLOCK)
                x = tl.load(row_ptr + v, mask=v < VOCAB, other=float("-inf"))
                is_kept = (_ordered_key(x) >= kth_key) & (v < VOCAB)
                total += tl.sum(tl.where(is_kept, tl.exp(x - row_max), 0.0), axis=0)
            budget = 1.0 - tl.load(top_p_ptr + row).to(tl.float32)
            # the largest key K whose probability mass at or below it (over the kept tokens) <= budget
            hi = tl.full([], 2147483647, tl.int64)
            for _ in range(9):  # 2^32 + 1 keys (with "none"), 16 times fewer each pass
                candidates = _candidates(cut_key, hi, RADIX)
                mass = tl.zeros([RADIX], tl.float32)
                for start in range(0, VOCAB, BLOCK):
                    v = start + tl.arange(0, BLOCK)
                    x = tl.load(row_ptr + v, mask=v < VOCAB, other=float("-inf"))
                    key = _ordered_key(x)
                    prob = tl.where((key >= kth_key) & (v < VOCAB), tl.exp(x - row_max) / total, 0.0)
                    mass += tl.sum(tl.where(key[None, :] <= candidates[:, None], prob[None, :], 0.0), axis=1)
                cut_key, hi = _narrow(cut_key, hi, mass <= budget, RADIX)
        for start in range(0, VOCAB, BLOCK):
            v = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + v, mask=v < VOCAB)
            key = _ordered_key(x)
            is_removed = (key < kth_key) | ((key <= cut_key) & (key < max_key))  # the most likely stays
            tl.store(out_ptr + row * stride_o + v, tl.where(is_removed, float("-inf"), x), mask=v < VOCAB)


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    batch, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    apply_top_k, apply_top_p = bool((top_k < vocab).any()), bool((top_p < 1).any())  # the twin's skips
    if not (apply_top_k or apply_top_p):
        return logits
    out = torch.empty_like(logits)
    _top_k_top_p_kernel[(batch,)](
        logits, top_k, top_p, out, logits.stride(0), out.stride(0), VOCAB=vocab,
        BLOCK=min(block, triton.next_power_of_2(vocab)), RADIX=16, APPLY_TOP_K=apply_top_k, APPLY_TOP_P=apply_top_p)
    return out
