"""Every Triton kernel against its torch twin on small shapes; run by test_triton_kernels.py.

Run as a script in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads the variable when it
is first imported), it runs every case of CASES in this one process and prints one JSON object:
{case name: error}, where error is the largest absolute difference from the twin divided by the
largest absolute value of the twin's output (0 for the kernels that only move values), or the
traceback's text when the case raised. On a GPU, run it without the variable to check the kernels
for real (`python test/common/triton_check.py cuda`).

The twin runs on fp32 copies of the kernel's (rounded) inputs, so what is measured is the kernel's
own error: its summation order, and the rounding of its output to the input dtype.
"""

import json
import sys
import traceback
from dataclasses import dataclass
from functools import partial

import torch

from lightvlm.common.triton_kernels.context_attention import context_attention, context_attention_torch
from lightvlm.common.triton_kernels.copy_kv import copy_kv, copy_kv_torch
from lightvlm.common.triton_kernels.embed_splice import embed_splice, embed_splice_torch
from lightvlm.common.triton_kernels.rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_torch,
    rmsnorm,
    rmsnorm_torch,
)
from lightvlm.common.triton_kernels.rotary import rotary, rotary_torch
from lightvlm.common.triton_kernels.rotary_copy_kv import rotary_copy_kv, rotary_copy_kv_torch
from lightvlm.common.triton_kernels.silu_and_mul import silu_and_mul, silu_and_mul_torch
from lightvlm.common.triton_kernels.token_decode_attention import token_decode_attention, token_decode_attention_torch
from lightvlm.common.triton_kernels.token_decode_attention_split import (
    token_decode_attention_split,
    token_decode_attention_split_torch,
)
from lightvlm.common.triton_kernels.top_k_top_p import top_k_top_p, top_k_top_p_torch

DEVICE = "cpu"


@dataclass(frozen=True)
class Case:
    name: str
    dtype: str  # "float32", "bfloat16", "float16": picks the tolerance
    is_exact: bool  # the kernel only moves values: any difference is a bug
    run: partial  # () -> error


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.float().abs().max())
    assert scale > 0, "a check whose expected output is all zeros proves nothing"
    return float((out.float() - expected.float()).abs().max()) / scale


def randn(*shape, generator, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)


def fp32(x: torch.Tensor) -> torch.Tensor:
    """The twin's copy of an input: always a copy (`.float()` of an fp32 tensor is the tensor itself,
    and the in-place kernels would then see the twin's output)."""
    return x.to(torch.float32, copy=True)


def scattered_table(lengths: list[int], num_slots: int, generator, extra_rows: int = 0) -> torch.Tensor:
    """A slot table whose rows hold distinct slots in random order, as the allocator hands them out;
    `extra_rows` unused rows first, so that the requests' table rows are not 0..B-1."""
    table = torch.zeros(extra_rows + len(lengths), max(lengths) + 3, dtype=torch.long)
    for b, n in enumerate(lengths):
        table[extra_rows + b, :n] = torch.randperm(num_slots, generator=generator)[:n]
    return table.to(DEVICE)


# ---- attention


def context_attention_error(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(heads * dim + kv_heads)
    num_slots = 300
    # (prefix, new tokens): prefix 0 and > 0, odd lengths, a chunk of one, a chunk past one query block
    chunks = [(0, 5), (21, 37), (3, 1), (0, 19)]
    lengths = [prefix + n for prefix, n in chunks]
    table = scattered_table(lengths, num_slots, generator, extra_rows=2)
    table_rows = torch.tensor([5, 2, 3, 4], device=DEVICE)  # rows out of order
    num_new = torch.tensor([n for _, n in chunks], device=DEVICE)
    prefix_lens = torch.tensor([prefix for prefix, _ in chunks], device=DEVICE)
    q_starts = torch.tensor([0, 7, 44, 45], device=DEVICE)  # rows 5, 6: decode rows of the step, left alone
    k_cache = randn(kv_heads, num_slots, dim, generator=generator, dtype=dtype)
    v_cache = randn(kv_heads, num_slots, dim, generator=generator, dtype=dtype)
    q = randn(64, heads, dim, generator=generator, dtype=dtype)
    args = (table, table_rows, q_starts, num_new, prefix_lens)
    expected = context_attention_torch(fp32(q), fp32(k_cache), fp32(v_cache), *args,
                                       out=torch.zeros(q.shape, device=DEVICE))
    out = context_attention(q, k_cache, v_cache, *args, max_num_new=37, out=torch.zeros_like(q), block_m=16, block_n=16)
    return relative_error(out, expected)


def decode_inputs(heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(heads * dim - kv_heads)
    num_slots, lengths = 400, [1, 70, 131]
    k_cache = randn(kv_heads, num_slots, dim, generator=generator, dtype=dtype)
    v_cache = randn(kv_heads, num_slots, dim, generator=generator, dtype=dtype)
    q = randn(len(lengths), heads, dim, generator=generator, dtype=dtype)
    return q, k_cache, v_cache, scattered_table(lengths, num_slots, generator), torch.tensor(lengths, device=DEVICE)


def decode_attention_error(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> float:
    q, k_cache, v_cache, table, lengths = decode_inputs(heads, kv_heads, dim, dtype)
    expected = token_decode_attention_torch(fp32(q), fp32(k_cache), fp32(v_cache), table, lengths)
    return relative_error(token_decode_attention(q, k_cache, v_cache, table, lengths, block=32), expected)


def split_decode_attention_error(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, num_splits: int) -> float:
    """num_splits 4 over a context of 1: three empty pieces, which the merge must weigh 0."""
    q, k_cache, v_cache, table, lengths = decode_inputs(heads, kv_heads, dim, dtype)
    expected = token_decode_attention_split_torch(fp32(q), fp32(k_cache), fp32(v_cache), table, lengths)
    out = token_decode_attention_split(q, k_cache, v_cache, table, lengths, num_splits=num_splits, block=16)
    return relative_error(out, expected)


# ---- KV write and rotary


def fused_qkv(num_rows: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, generator):
    """q, k, v as the decoder makes them: views of one [T, (heads + 2 kv_heads) D] projection."""
    qkv = randn(num_rows, (heads + 2 * kv_heads) * dim, generator=generator, dtype=dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.view(num_rows, heads, dim), k.view(num_rows, kv_heads, dim), v.view(num_rows, kv_heads, dim)


def copy_kv_error(kv_heads: int, dim: int, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(kv_heads * dim)
    _, k, v = fused_qkv(9, 2, kv_heads, dim, dtype, generator)
    slots = torch.randperm(40, generator=generator)[:9].to(DEVICE)
    caches = [randn(kv_heads, 40, dim, generator=generator, dtype=dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    copy_kv(k, v, *caches, slots)
    copy_kv_torch(k, v, *expected, slots)
    return max(relative_error(c, e) for c, e in zip(caches, expected))


def rotary_inputs(dim: int, mrope_section, generator, num_rows: int = 7):
    """Positions, and cos/sin tables of random angles whose two halves differ: a kernel reading a
    column from the wrong half or the wrong position's row cannot pass."""
    positions_max = 64
    angles = torch.rand(positions_max, dim, generator=generator) * 6.3
    shape = (3, num_rows) if mrope_section else (num_rows,)
    positions = torch.randint(0, positions_max, shape, generator=generator)
    return positions.to(DEVICE), angles.cos().to(DEVICE), angles.sin().to(DEVICE)


def rotary_error(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, mrope_section, is_interleaved) -> float:
    generator = torch.Generator().manual_seed(dim + heads)
    q, k, _ = fused_qkv(7, heads, kv_heads, dim, dtype, generator)
    positions, cos, sin = rotary_inputs(dim, mrope_section, generator)
    expected = rotary_torch(fp32(q), fp32(k), positions, cos, sin, mrope_section, is_interleaved)
    out = rotary(q, k, positions, cos, sin, mrope_section, is_interleaved)
    return max(relative_error(o, e) for o, e in zip(out, expected))


def rotary_copy_kv_error(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, mrope_section,
                         is_interleaved) -> float:
    generator = torch.Generator().manual_seed(dim * heads)
    q, k, v = fused_qkv(7, heads, kv_heads, dim, dtype, generator)
    positions, cos, sin = rotary_inputs(dim, mrope_section, generator)
    slots = torch.randperm(30, generator=generator)[:7].to(DEVICE)
    caches = [randn(kv_heads, 30, dim, generator=generator, dtype=dtype) for _ in range(2)]
    expected_caches = [fp32(c) for c in caches]
    k_before = k.clone()
    expected_q = rotary_copy_kv_torch(fp32(q), fp32(k), fp32(v), *expected_caches, slots, positions, cos, sin,
                                      mrope_section, is_interleaved)
    out_q = rotary_copy_kv(q, k, v, *caches, slots, positions, cos, sin, mrope_section, is_interleaved)
    assert torch.equal(k, k_before), "rotary_copy_kv must leave k as it was"
    errors = [relative_error(out_q, expected_q)]
    return max(errors + [relative_error(c, e) for c, e in zip(caches, expected_caches)])


# ---- elementwise


def rmsnorm_error(num_rows: int, hidden: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> float:
    generator = torch.Generator().manual_seed(hidden)
    x = randn(num_rows, 3, hidden, generator=generator, dtype=dtype)
    weight = (1 + randn(hidden, generator=generator)).to(weight_dtype or dtype)
    # the twin in fp32 throughout, but the weight in its own dtype: that sets the output's dtype
    expected = rmsnorm_torch(fp32(x), fp32(weight), 1e-6)
    out = rmsnorm(x, weight, 1e-6)
    assert out.dtype == torch.promote_types(dtype, weight.dtype) and out.shape == x.shape
    return relative_error(out, expected)


def fused_add_rmsnorm_error(num_rows: int, hidden: int, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(hidden + 1)
    x, residual = (randn(num_rows, hidden, generator=generator, dtype=dtype) for _ in range(2))
    weight = (1 + randn(hidden, generator=generator)).to(dtype)
    expected = fused_add_rmsnorm_torch(fp32(x), fp32(residual), fp32(weight), 1e-6)
    out = fused_add_rmsnorm(x, residual, weight, 1e-6)
    return max(relative_error(o, e) for o, e in zip(out, expected))


def silu_and_mul_error(intermediate: int, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(intermediate)
    x = randn(3, 5, 2 * intermediate, generator=generator, dtype=dtype) * 3
    return relative_error(silu_and_mul(x, block=64), silu_and_mul_torch(fp32(x)))


def embed_splice_error(hidden: int, dtype: torch.dtype, image_dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(hidden)
    embeds = randn(12, hidden, generator=generator, dtype=dtype)
    rows = torch.tensor([9, 2, 3, 4, 11], device=DEVICE)
    image = randn(5, hidden, generator=generator, dtype=image_dtype)
    expected = embed_splice_torch(embeds.clone(), rows, image)
    return relative_error(embed_splice(embeds, rows, image, block=64), expected)


# ---- sampling


def top_k_top_p_error(case: str, block: int) -> float:
    """The share of tokens on which the kernel and the twin disagree about -inf, or about a value."""
    generator = torch.Generator().manual_seed(7)
    vocab = 300
    logits = torch.randn(6, vocab, generator=generator) * 3
    logits[1, :50] = 2.0  # ties at the top-k boundary: all stay
    logits[2, 10] = float("-inf")  # a banned token
    logits[3] = logits[3].round()  # ties everywhere
    logits[5, :100] = -200.0  # probabilities that underflow to 0
    top_k, top_p = {
        "both": ([5, 50, 300, 10, 1000, 1], [0.9, 1.0, 0.5, 1.0, 0.3, 1.0]),
        "top_k": ([5, 50, 300, 10, 1000, 1], [1.0] * 6),
        "top_p": ([vocab] * 6, [0.9, 1.0, 0.5, 0.0, 0.3, 0.99]),
        "extremes": ([0, 2, 3, 4, 5, 6], [0.0, 0.1, 0.99, 0.5, 0.7, 1.0]),
    }[case]
    top_k, top_p = torch.tensor(top_k, device=DEVICE), torch.tensor(top_p, device=DEVICE)
    logits = logits.to(DEVICE)
    expected = top_k_top_p_torch(logits, top_k, top_p)
    out = top_k_top_p(logits, top_k, top_p, block=block)
    assert bool(expected.isinf().any()), "a case that filters nothing proves nothing"
    return float((out != expected).float().mean())


# ---- the cases


def _cases() -> list[Case]:
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    names = {f32: "float32", bf16: "bfloat16", f16: "float16"}
    cases = []

    def add(name: str, dtype: torch.dtype, run, *args, is_exact: bool = False):
        cases.append(Case(f"{name}-{names[dtype]}", names[dtype], is_exact, partial(run, *args)))

    # GQA ratios 1, 2, 3, 4; head dims 64, 80 (not a power of two), 128; every dtype
    attention_shapes = [(4, 4, 64, f32), (4, 2, 80, f32), (6, 2, 128, f32), (8, 2, 64, bf16), (6, 2, 80, f16),
                        (4, 1, 128, bf16), (4, 2, 64, f16)]
    for heads, kv_heads, dim, dtype in attention_shapes:
        shape = f"h{heads}kv{kv_heads}d{dim}"
        add(f"context_attention-{shape}", dtype, context_attention_error, heads, kv_heads, dim, dtype)
        add(f"token_decode_attention-{shape}", dtype, decode_attention_error, heads, kv_heads, dim, dtype)
        for num_splits in (3, 4):
            add(f"token_decode_attention_split-{shape}-s{num_splits}", dtype, split_decode_attention_error, heads,
                kv_heads, dim, dtype, num_splits)
    for kv_heads, dim, dtype in [(2, 80, f32), (3, 64, bf16), (1, 128, f16)]:
        add(f"copy_kv-kv{kv_heads}d{dim}", dtype, copy_kv_error, kv_heads, dim, dtype, is_exact=True)
    # 1-D positions, M-RoPE in Qwen2-VL's contiguous sections and Qwen3-VL's interleaved form
    rotary_shapes = [(4, 2, 64, f32, None, False), (6, 2, 80, f32, [8, 16, 16], False),
                     (4, 4, 128, f32, [24, 20, 20], True), (6, 3, 128, bf16, [16, 24, 24], False),
                     (8, 2, 64, f16, [12, 10, 10], True), (4, 1, 80, bf16, None, False)]
    for heads, kv_heads, dim, dtype, section, is_interleaved in rotary_shapes:
        form = "1d" if section is None else ("interleaved" if is_interleaved else "sections")
        shape = f"h{heads}kv{kv_heads}d{dim}-{form}"
        add(f"rotary-{shape}", dtype, rotary_error, heads, kv_heads, dim, dtype, section, is_interleaved)
    for heads, kv_heads, dim, dtype, section, is_interleaved in rotary_shapes[1:5]:
        form = "1d" if section is None else ("interleaved" if is_interleaved else "sections")
        shape = f"h{heads}kv{kv_heads}d{dim}-{form}"
        add(f"rotary_copy_kv-{shape}", dtype, rotary_copy_kv_error, heads, kv_heads, dim, dtype, section,
            is_interleaved)
    for dtype in (f32, bf16, f16):
        add("rmsnorm-h120", dtype, rmsnorm_error, 5, 120, dtype)
        add("fused_add_rmsnorm-h96", dtype, fused_add_rmsnorm_error, 7, 96, dtype)
        add("silu_and_mul-i150", dtype, silu_and_mul_error, 150, dtype)
        add("embed_splice-h100", dtype, embed_splice_error, 100, dtype, dtype, is_exact=True)
    add("rmsnorm-h64-fp32_weight", bf16, rmsnorm_error, 3, 64, bf16, f32)
    # fp32 -> fp16 rounds to nearest under the interpreter as on a GPU (fp32 -> bf16 truncates there)
    add("embed_splice-h100-from_float32", f16, embed_splice_error, 100, f16, f32, is_exact=True)
    for case in ("both", "top_k", "top_p", "extremes"):
        add(f"top_k_top_p-{case}", f32, top_k_top_p_error, case, 128, is_exact=True)
    add("top_k_top_p-both-one_block", f32, top_k_top_p_error, "both", 512, is_exact=True)
    return cases


CASES = _cases()


def run_all() -> dict[str, float | str]:
    results = {}
    for case in CASES:
        try:
            results[case.name] = case.run()
        except Exception:  # reported per case: one broken kernel must not hide the others' results
            results[case.name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1:
        DEVICE = sys.argv[1]
    print(json.dumps(run_all()))
