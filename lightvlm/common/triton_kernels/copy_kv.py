"""Write a step's K and V rows into the token-indexed KV buffer at their slots.

    copy_kv(k, v, k_cache, v_cache, slots)

k, v: [T, kv_heads, D] (the step's rows; any row and head strides); k_cache, v_cache:
[kv_heads, num_slots, D]; slots: [T] integer, distinct, in any order. After the call
k_cache[:, slots[t]] == k[t] (cast to the cache's dtype), likewise for v. Writes in place, returns None.

`gather_kv(cache, slots)` reads rows back: cache[:, slots] as [kv_heads, len(slots), D], for the
torch twins that attend over a gathered context.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[:, slots] ([kv_heads, num_slots, D] -> [kv_heads, len(slots), D]), one contiguous-row
    index_select per head: on the CPU 2-4x faster than one index_select along the slot dimension."""
    out = cache.new_empty((cache.shape[0], slots.shape[0], cache.shape[2]))
    for head in range(cache.shape[0]):
        torch.index_select(cache[head], 0, slots, out=out[head])
    return out


def copy_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """The torch twin: one index_copy_ per cache, as the engine writes the KV today."""
    k_cache.index_copy_(1, slots, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v.transpose(0, 1).to(v_cache.dtype))


if triton is not None:

    @triton.jit
    def _copy_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_kt, stride_kh, stride_vt,
                        stride_vh, stride_kch, stride_kcs, stride_vch, stride_vcs, KV_HEADS: tl.constexpr,
                        HEADS_POW2: tl.constexpr, DIM: tl.constexpr, DIM_POW2: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t)
        h = tl.arange(0, HEADS_POW2)[:, None]
        d = tl.arange(0, DIM_POW2)[None, :]
        mask = (h < KV_HEADS) & (d < DIM)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(k_cache_ptr + h * stride_kch + slot * stride_kcs + d, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(v_cache_ptr + h * stride_vch + slot * stride_vcs + d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def copy_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            slots: torch.Tensor) -> None:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): one program per row."""
    num_rows, kv_heads, dim = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    _copy_kv_kernel[(num_rows,)](
        k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        KV_HEADS=kv_heads, HEADS_POW2=triton.next_power_of_2(kv_heads), DIM=dim,
        DIM_POW2=triton.next_power_of_2(dim))
