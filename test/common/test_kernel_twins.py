"""The kernels' torch twins (the CPU path) against plain references, without Triton.

The interpreter tests compare each kernel with its twin; these prove the twins themselves: against
naive loops in float64, and against transformers' own layers (bit for bit where the engine's CPU
path must stay token-exact with it).
"""

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb as hf_apply_rotary
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from lightvlm.common.triton_kernels.context_attention import context_attention_torch
from lightvlm.common.triton_kernels.copy_kv import copy_kv_torch, gather_kv
from lightvlm.common.triton_kernels.embed_splice import embed_splice_torch
from lightvlm.common.triton_kernels.rmsnorm import fused_add_rmsnorm_torch, rmsnorm_torch
from lightvlm.common.triton_kernels.rotary import mrope_axes, rotary_torch
from lightvlm.common.triton_kernels.rotary_copy_kv import rotary_copy_kv_torch
from lightvlm.common.triton_kernels.silu_and_mul import silu_and_mul_torch
from lightvlm.common.triton_kernels.token_decode_attention import token_decode_attention_torch
from lightvlm.common.triton_kernels.token_decode_attention_split import token_decode_attention_split_torch
from lightvlm.common.triton_kernels.top_k_top_p import top_k_top_p_torch
from lightvlm.models.layers.rotary import RotaryEmbedding


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """q: [n, heads, D] at `positions` of a context; k, v: [L, kv_heads, D]; float64, one query at a time."""
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, position in enumerate(positions):
        for h in range(heads):
            keys = k[: position + 1, h // (heads // kv_heads)].double()
            weights = torch.softmax(keys @ q[i, h].double() / dim**0.5, dim=0)
            out[i, h] = weights @ v[: position + 1, h // (heads // kv_heads)].double()
    return out


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 64), (4, 2, 80), (6, 2, 32), (8, 2, 16)])
def test_context_attention_twin_is_causal_attention_after_the_prefix(heads, kv_heads, dim):
    generator = torch.Generator().manual_seed(heads + dim)
    num_slots = 120
    k_cache, v_cache = (torch.randn(kv_heads, num_slots, dim, generator=generator) for _ in range(2))
    chunks = [(0, 6), (13, 4), (2, 1), (0, 1)]  # (prefix, new tokens)
    table = torch.zeros(6, 20, dtype=torch.long)
    table_rows = torch.tensor([4, 0, 5, 2])
    for row, (prefix, n) in zip(table_rows.tolist(), chunks):
        table[row, : prefix + n] = torch.randperm(num_slots, generator=generator)[: prefix + n]
    q_starts = torch.tensor([1, 7, 11, 12])  # row 0: a decode row of the step
    q = torch.randn(13, heads, dim, generator=generator)
    out = context_attention_torch(q, k_cache, v_cache, table, table_rows, q_starts,
                                  torch.tensor([n for _, n in chunks]), torch.tensor([p for p, _ in chunks]),
                                  out=torch.full_like(q, 7.0))
    for row, start, (prefix, n) in zip(table_rows.tolist(), q_starts.tolist(), chunks):
        slots = table[row, : prefix + n]
        expected = naive_attention(q[start : start + n], k_cache[:, slots].transpose(0, 1),
                                   v_cache[:, slots].transpose(0, 1), list(range(prefix, prefix + n)))
        torch.testing.assert_close(out[start : start + n].double(), expected, rtol=1e-5, atol=1e-5)
    assert bool((out[0] == 7.0).all()), "rows of no request must be left as they were"


@pytest.mark.parametrize("twin", [token_decode_attention_torch, token_decode_attention_split_torch])
def test_decode_attention_twins_attend_each_whole_context(twin):
    generator = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, num_slots = 6, 2, 32, 90
    lengths = [1, 17, 40]
    k_cache, v_cache = (torch.randn(kv_heads, num_slots, dim, generator=generator) for _ in range(2))
    table = torch.zeros(3, 40, dtype=torch.long)
    for b, n in enumerate(lengths):
        table[b, :n] = torch.randperm(num_slots, generator=generator)[:n]
    table[0, 1:] = 5  # stale slots past a length must not count
    q = torch.randn(3, heads, dim, generator=generator)
    out = twin(q, k_cache, v_cache, table, torch.tensor(lengths))
    for b, n in enumerate(lengths):
        slots = table[b, :n]
        expected = naive_attention(q[b : b + 1], k_cache[:, slots].transpose(0, 1), v_cache[:, slots].transpose(0, 1),
                                   [n - 1])
        torch.testing.assert_close(out[b : b + 1].double(), expected, rtol=1e-5, atol=1e-5)


def test_copy_kv_twin_writes_each_row_at_its_slot():
    generator = torch.Generator().manual_seed(0)
    k, v = (torch.randn(5, 3, 8, generator=generator) for _ in range(2))
    k_cache, v_cache = torch.zeros(3, 12, 8), torch.zeros(3, 12, 8)
    slots = torch.tensor([9, 0, 4, 11, 2])
    copy_kv_torch(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[:, slot], k[t]) and torch.equal(v_cache[:, slot], v[t])
    untouched = [s for s in range(12) if s not in slots.tolist()]
    assert not k_cache[:, untouched].any() and not v_cache[:, untouched].any()


def hf_mrope_angles(head_dim: int, positions: torch.Tensor, mrope_section: list[int], is_interleaved: bool):
    """cos, sin [T, D] as transformers' Qwen2-VL (contiguous) or Qwen3-VL (interleaved) text rotary."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section}
    if is_interleaved:
        config = Qwen3VLTextConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                   rope_parameters={**rope, "mrope_interleaved": True})
        embedding = Qwen3VLTextRotaryEmbedding(config)
    else:
        config = Qwen2VLTextConfig(hidden_size=2 * head_dim, num_attention_heads=2, rope_parameters=rope)
        embedding = Qwen2VLRotaryEmbedding(config)
    cos, sin = embedding(torch.zeros(1), positions[:, None, :])
    return cos[0], sin[0]


@pytest.mark.parametrize(("mrope_section", "is_interleaved"), [([16, 24, 24], False), ([24, 20, 20], True)])
def test_rotary_twin_matches_transformers_mrope(mrope_section, is_interleaved):
    generator = torch.Generator().manual_seed(1)
    head_dim, num_rows = 128, 9
    positions = torch.randint(0, 50, (3, num_rows), generator=generator)
    table = RotaryEmbedding(head_dim, 64, 10000.0)
    q = torch.randn(num_rows, 4, head_dim, generator=generator)
    k = torch.randn(num_rows, 2, head_dim, generator=generator)
    cos, sin = hf_mrope_angles(head_dim, positions, mrope_section, is_interleaved)
    expected_q, expected_k = hf_apply_rotary(q.transpose(0, 1), k.transpose(0, 1), cos, sin, unsqueeze_dim=0)
    out_q, out_k = rotary_torch(q.clone(), k.clone(), positions, table.cos, table.sin, mrope_section, is_interleaved)
    torch.testing.assert_close(out_q, expected_q.transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out_k, expected_k.transpose(0, 1), rtol=0, atol=1e-6)


def test_mrope_forms_differ_and_same_positions_reduce_to_1d():
    """The two section forms pick different axes; with equal t/h/w positions both are the 1-D rotary."""
    assert not torch.equal(mrope_axes(128, [24, 20, 20], True), mrope_axes(128, [24, 20, 20], False))
    generator = torch.Generator().manual_seed(2)
    table = RotaryEmbedding(64, 40, 10000.0)
    positions = torch.randint(0, 40, (5,), generator=generator)
    q, k = torch.randn(5, 2, 64, generator=generator), torch.randn(5, 1, 64, generator=generator)
    flat = rotary_torch(q.clone(), k.clone(), positions, table.cos, table.sin)
    for is_interleaved in (False, True):
        mrope = rotary_torch(q.clone(), k.clone(), positions.expand(3, -1), table.cos, table.sin, [8, 12, 12],
                             is_interleaved)
        assert torch.equal(mrope[0], flat[0]) and torch.equal(mrope[1], flat[1])
    with pytest.raises(ValueError, match="summing to head_dim / 2"):
        mrope_axes(64, [8, 12, 11], False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_twin_is_transformers_rotation(dtype):
    """Bit for bit transformers' apply_rotary_pos_emb with the table's rows cast to q's dtype (as its
    rotary embeddings return them)."""
    generator = torch.Generator().manual_seed(4)
    embedding = RotaryEmbedding(80, 100, 10000.0)
    q, k = torch.randn(6, 4, 80, generator=generator).to(dtype), torch.randn(6, 2, 80, generator=generator).to(dtype)
    positions = torch.tensor([0, 99, 3, 3, 50, 7])
    cos, sin = embedding.cos[positions].to(dtype), embedding.sin[positions].to(dtype)
    expected_q, expected_k = (x.transpose(0, 1) for x in hf_apply_rotary(q.transpose(0, 1), k.transpose(0, 1), cos,
                                                                          sin, unsqueeze_dim=0))
    out_q, out_k = rotary_torch(q, k, *embedding.angles(positions))
    assert torch.equal(out_q, expected_q) and torch.equal(out_k, expected_k)


def test_rotary_copy_kv_twin_is_rotary_then_copy():
    generator = torch.Generator().manual_seed(5)
    embedding = RotaryEmbedding(64, 30, 10000.0)
    q = torch.randn(4, 4, 64, generator=generator)
    k, v = (torch.randn(4, 2, 64, generator=generator) for _ in range(2))
    positions = torch.randint(0, 30, (3, 4), generator=generator)
    slots = torch.tensor([7, 1, 3, 0])
    k_cache, v_cache = torch.zeros(2, 8, 64), torch.zeros(2, 8, 64)
    expected_q, expected_k = rotary_torch(q.clone(), k.clone(), positions, embedding.cos, embedding.sin, [8, 12, 12])
    k_before = k.clone()
    out_q = rotary_copy_kv_torch(q, k, v, k_cache, v_cache, slots, positions, embedding.cos, embedding.sin,
                                 [8, 12, 12])
    assert torch.equal(out_q, expected_q) and torch.equal(k, k_before)
    assert torch.equal(k_cache[:, slots].transpose(0, 1), expected_k)
    assert torch.equal(v_cache[:, slots].transpose(0, 1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_twins_are_transformers_rmsnorm(dtype):
    generator = torch.Generator().manual_seed(6)
    norm = Qwen2RMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48, generator=generator)
    norm = norm.to(dtype)
    x, residual = (torch.randn(5, 48, generator=generator).to(dtype) for _ in range(2))
    with torch.no_grad():
        assert torch.equal(rmsnorm_torch(x, norm.weight, 1e-5), norm(x))
        out, summed = fused_add_rmsnorm_torch(x, residual, norm.weight, 1e-5)
        assert torch.equal(summed, x + residual) and torch.equal(out, norm(x + residual))
    naive = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    torch.testing.assert_close(rmsnorm_torch(x, norm.weight, 1e-5).double(), naive,
                               **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))


def test_silu_and_mul_twin_is_silu_of_gate_times_up():
    x = torch.randn(3, 2, 20, generator=torch.Generator().manual_seed(7))
    gate, up = x[..., :10], x[..., 10:]
    assert torch.equal(silu_and_mul_torch(x), ACT2FN["silu"](gate) * up)  # transformers' gated MLP
    torch.testing.assert_close(silu_and_mul_torch(x), gate / (1 + torch.exp(-gate)) * up)


def test_embed_splice_twin_overwrites_only_the_placeholder_rows():
    generator = torch.Generator().manual_seed(8)
    embeds = torch.randn(7, 6, generator=generator).to(torch.bfloat16)
    before = embeds.clone()
    image = torch.randn(3, 6, generator=generator)
    rows = [5, 1, 2]
    out = embed_splice_torch(embeds, torch.tensor(rows), image)
    assert out is embeds
    for r, row in enumerate(rows):
        assert torch.equal(embeds[row], image[r].to(torch.bfloat16))
    assert torch.equal(embeds[[0, 3, 4, 6]], before[[0, 3, 4, 6]])


def naive_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Row by row, in float64, from the definitions (the test's rows have no ties at the top-p cut).

    As the sampler does, the top-p rule runs on every row once any row has top_p < 1."""
    out = logits.clone()
    for b, (k, p) in enumerate(zip(top_k, top_p)):
        row = logits[b].double()
        kth = sorted(row.tolist(), reverse=True)[min(max(k, 1), row.numel()) - 1]
        row = row.masked_fill(row < kth, float("-inf"))
        if any(q < 1 for q in top_p):
            probs = row.softmax(0)
            order = probs.argsort()  # least likely first
            mass = probs[order].cumsum(0)
            is_removed = mass <= 1 - p
            is_removed[-1] = False  # the most likely token always stays
            row[order[is_removed]] = float("-inf")
        out[b] = row.float()
    return out


def test_top_k_top_p_twin_is_the_definition_row_by_row():
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 64, generator=generator) * 2
    logits[1, :10] = 10.0  # the ten largest, tied: top-k 5 keeps all ten
    logits[2, 4] = float("-inf")
    top_k, top_p = [3, 5, 64, 100, 0], [0.8, 1.0, 0.5, 0.0, 1.0]
    k, p = torch.tensor(top_k), torch.tensor(top_p)
    expected = naive_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(top_k_top_p_torch(logits, k, p).isinf(), expected.isinf())
    kept = top_k_top_p_torch(logits, k, p).isfinite().sum(dim=1).tolist()
    assert kept[1] == 10 and kept[3] == 1  # the ten tied tokens all stay; top_p 0 keeps the most likely


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kv_is_the_slot_index_bit_for_bit(dtype):
    torch.manual_seed(0)
    cache = torch.randn(3, 200, 80).to(dtype)
    slots = torch.tensor([5, 199, 0, 17, 17, 42, 3])  # out of order, a repeat (a padded table's filler)
    gathered = gather_kv(cache, slots)
    assert gathered.shape == (3, 7, 80) and gathered.is_contiguous()
    assert torch.equal(gathered, cache[:, slots]) and torch.equal(gathered, cache.index_select(1, slots))
    assert gather_kv(cache, slots[:0]).shape == (3, 0, 80)
