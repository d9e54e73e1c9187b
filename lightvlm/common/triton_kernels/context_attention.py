"""Prefill attention over the token-indexed KV buffer: causal, after a cached prefix, GQA, varlen.

    out = context_attention(q, k_cache, v_cache, slot_table, table_rows, q_starts, num_new, prefix_lens)

A step's query rows are all requests' new tokens flattened: q: [T, heads, D]. Request b (of B) owns
the rows [q_starts[b], q_starts[b] + num_new[b]); they sit at positions prefix_lens[b] .. prefix_lens[b]
+ num_new[b] - 1 of its context. Its context's L = prefix_lens[b] + num_new[b] slots are the first L
entries of slot_table[table_rows[b]] (slot_table: [R, max_len], e.g. the model runner's req_to_slots),
and their K and V are already in the cache (this step's own rows included): k_cache, v_cache:
[kv_heads, slots, D]. Query i of request b attends the context's keys 0 .. prefix_lens[b] + i (the
causal mask, offset by the prefix: 0 when nothing was cached). Heads share KV heads in groups of
heads / kv_heads. B, q_starts, num_new, prefix_lens, table_rows: [B] integer tensors.

Returns out: [T, heads, D] in q's dtype, written only on the requests' rows: pass `out` to fill the
rest of a step's rows (e.g. its decode rows) into the same tensor. `max_num_new` sizes the kernel's
grid: at least the largest num_new (rows past it are not computed), given from the host to spare a
device sync; when None it is read from num_new. The twin ignores it.
"""

import torch
import torch.nn.functional as F

from lightvlm.common.triton_kernels.copy_kv import gather_kv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def context_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_table: torch.Tensor, table_rows: torch.Tensor, q_starts: torch.Tensor,
                            num_new: torch.Tensor, prefix_lens: torch.Tensor, max_num_new: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """The torch twin: one SDPA per request over its context gathered from the cache.

    SDPA in q's dtype with `enable_gqa`, exactly as the engine's CPU prefill computes it today."""
    out = torch.empty_like(q) if out is None else out
    for row, start, n, prefix in zip(table_rows.tolist(), q_starts.tolist(), num_new.tolist(),
                                     prefix_lens.tolist()):
        slots = slot_table[row, :prefix + n]
        k = gather_kv(k_cache, slots).unsqueeze(0)  # [1, kv_heads, L, D]
        v = gather_kv(v_cache, slots).unsqueeze(0)
        queries = q[start:start + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, D]
        if prefix == 0:
            attended = F.scaled_dot_product_attention(queries, k, v, is_causal=True, enable_gqa=True)
        else:  # SDPA's is_causal aligns the mask top-left; with a prefix it must be bottom-right
            query_pos = torch.arange(prefix, prefix + n, device=q.device)[:, None]
            mask = torch.arange(prefix + n, device=q.device)[None, :] <= query_pos
            attended = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, enable_gqa=True)
        out[start:start + n] = attended.squeeze(0).transpose(0, 1)
    return out


if triton is not None:

    @triton.jit
    def _context_kernel(q_ptr, k_ptr, v_ptr, table_ptr, table_rows_ptr, q_starts_ptr, num_new_ptr, prefix_ptr,
                        out_ptr, scale, stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                        stride_table, stride_ot, stride_oh, GROUP: tl.constexpr, DIM: tl.constexpr,
                        DIM_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
        block_m = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2)
        num_new = tl.load(num_new_ptr + b)
        if block_m * BLOCK_M < num_new:
            kv_head = h // GROUP
            prefix = tl.load(prefix_ptr + b)
            q_start = tl.load(q_starts_ptr + b)
            table = table_ptr + tl.load(table_rows_ptr + b) * stride_table
            m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the request
            is_query = m < num_new
            d = tl.arange(0, DIM_POW2)  # tl.arange needs a power of two: the tail past DIM is masked
            in_dim = d < DIM
            # loaded, then upcast: the interpreter's 16-bit tl.dot is wrong, and on a GPU the tf32
            # dot of an upcast 16-bit value is exact
            q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                        mask=is_query[:, None] & in_dim[None, :], other=0.0).to(tl.float32)
            running_max = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a fully masked row stays NaN-free
            denominator = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, DIM_POW2], tl.float32)
            # the last key any query of this block may see is at prefix + its index
            end = tl.minimum(prefix + (block_m + 1) * BLOCK_M, prefix + num_new)
            for start_n in range(0, end, BLOCK_N):
                n = start_n + tl.arange(0, BLOCK_N)
                is_key = n < end
                slots = tl.load(table + n, mask=is_key, other=0)
                k = tl.load(k_ptr + kv_head * stride_kh + slots[None, :] * stride_ks + d[:, None],
                            mask=is_key[None, :] & in_dim[:, None], other=0.0).to(tl.float32)  # [D, N]
                scores = tl.dot(q, k, input_precision=PRECISION) * scale
                is_visible = is_key[None, :] & (n[None, :] <= prefix + m[:, None])
                scores = tl.where(is_visible, scores, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, axis=1))
                p = tl.exp(scores - new_max[:, None])
                correction = tl.exp(running_max - new_max)
                v = tl.load(v_ptr + kv_head * stride_vh + slots[:, None] * stride_vs + d[None, :],
                            mask=is_key[:, None] & in_dim[None, :], other=0.0).to(tl.float32)  # [N, D]
                acc = acc * correction[:, None] + tl.dot(p, v, input_precision=PRECISION)
                denominator = denominator * correction + tl.sum(p, axis=1)
                running_max = new_max
            attended = acc / tl.where(denominator > 0, denominator, 1.0)[:, None]
            tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
                     attended.to(out_ptr.dtype.element_ty), mask=is_query[:, None] & in_dim[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for values upcast from `dtype`: tf32 keeps a 16-bit value exact."""
    return "ieee" if dtype == torch.float32 else "tf32"


def context_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_table: torch.Tensor,
                      table_rows: torch.Tensor, q_starts: torch.Tensor, num_new: torch.Tensor,
                      prefix_lens: torch.Tensor, max_num_new: int | None = None, out: torch.Tensor | None = None,
                      block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): one program per (block of a
    request's queries, request, head), an online softmax over the visible key blocks; fp32 inside."""
    heads, dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q) if out is None else out
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and out.stride(2) == 1
    assert slot_table.stride(1) == 1 and heads % k_cache.shape[0] == 0
    if max_num_new is None:
        max_num_new = int(num_new.max())
    grid = (triton.cdiv(max_num_new, block_m), num_new.shape[0], heads)
    _context_kernel[grid](
        q, k_cache, v_cache, slot_table, table_rows, q_starts, num_new, prefix_lens, out, dim**-0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        slot_table.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // k_cache.shape[0], DIM=dim, DIM_POW2=triton.next_power_of_2(dim), BLOCK_M=block_m,
        BLOCK_N=block_n, PRECISION=dot_precision(k_cache.dtype), num_warps=4 if dim <= 64 else 8, num_stages=1)
    return out
