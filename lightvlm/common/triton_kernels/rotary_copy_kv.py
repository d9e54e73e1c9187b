"""Rotary on q and k fused with the KV write: one pass over the step's q, k and v.

    q = rotary_copy_kv(q, k, v, k_cache, v_cache, slots, positions, cos, sin, mrope_section=None,
                       is_interleaved=False)

Shapes as `rotary` and `copy_kv`: q: [T, heads, D], k, v: [T, kv_heads, D]; k_cache, v_cache:
[kv_heads, num_slots, D]; slots: [T]; positions: [T] or [3, T] (M-RoPE); cos, sin: [max_positions, D].
q is rotated in place and returned; the rotated k goes straight into k_cache[:, slots] and v into
v_cache[:, slots]. k itself is left as it was: what attends afterwards reads K from the cache.
Unfused, the rotated k is written back to k's rows and then read again to be copied.
"""

import torch

from lightvlm.common.triton_kernels.copy_kv import copy_kv_torch
from lightvlm.common.triton_kernels.rotary import (
    positions_axis_stride,
    rotary_angles,
    rotary_constants,
    rotate_half,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def rotary_copy_kv_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, mrope_section: list[int] | None = None,
                         is_interleaved: bool = False) -> torch.Tensor:
    """The torch twin: `rotary_torch`'s arithmetic, then `copy_kv_torch`."""
    row_cos, row_sin = rotary_angles(positions, cos, sin, mrope_section, is_interleaved)
    row_cos, row_sin = row_cos.unsqueeze(1).to(q.dtype), row_sin.unsqueeze(1).to(q.dtype)
    q.copy_(q * row_cos + rotate_half(q) * row_sin)
    copy_kv_torch(k * row_cos + rotate_half(k) * row_sin, v, k_cache, v_cache, slots)
    return q


if triton is not None:
    from lightvlm.common.triton_kernels.rotary import _rotate_heads, _row_angles

    @triton.jit
    def _rotary_copy_kv_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, positions_ptr, cos_ptr,
                               sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                               stride_kch, stride_kcs, stride_vch, stride_vcs, stride_axis, stride_cos,
                               stride_sin, HEADS: tl.constexpr, HEADS_POW2: tl.constexpr,
                               KV_HEADS: tl.constexpr, KV_HEADS_POW2: tl.constexpr, HALF: tl.constexpr,
                               HALF_POW2: tl.constexpr, IS_MROPE: tl.constexpr, IS_INTERLEAVED: tl.constexpr,
                               SECTION_T: tl.constexpr, SECTION_H: tl.constexpr, SECTION_W: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t)
        cos_lo, cos_hi, sin_lo, sin_hi = _row_angles(positions_ptr, stride_axis, t, cos_ptr, sin_ptr, stride_cos,
                                                     stride_sin, HALF, HALF_POW2, IS_MROPE, IS_INTERLEAVED,
                                                     SECTION_T, SECTION_H, SECTION_W)
        q_row = q_ptr + t * stride_qt
        lo, hi, offsets, mask = _rotate_heads(q_row, stride_qh, HEADS, HEADS_POW2, HALF, HALF_POW2,
                                              cos_lo, cos_hi, sin_lo, sin_hi)
        tl.store(q_row + offsets, lo.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_row + offsets + HALF, hi.to(q_ptr.dtype.element_ty), mask=mask)
        lo, hi, offsets, mask = _rotate_heads(k_ptr + t * stride_kt, stride_kh, KV_HEADS, KV_HEADS_POW2, HALF,
                                              HALF_POW2, cos_lo, cos_hi, sin_lo, sin_hi)
        h = tl.arange(0, KV_HEADS_POW2)[:, None]
        j = tl.arange(0, HALF_POW2)[None, :]
        k_slot = k_cache_ptr + slot * stride_kcs + h * stride_kch + j
        tl.store(k_slot, lo.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_slot + HALF, hi.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_row = v_ptr + t * stride_vt + h * stride_vh + j
        v_slot = v_cache_ptr + slot * stride_vcs + h * stride_vch + j
        tl.store(v_slot, tl.load(v_row, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_slot + HALF, tl.load(v_row + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_copy_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mrope_section: list[int] | None = None, is_interleaved: bool = False) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): one program per row; fp32 inside."""
    for x in (q, k, v, k_cache, v_cache, cos, sin):
        assert x.stride(-1) == 1
    _rotary_copy_kv_kernel[(q.shape[0],)](
        q, k, v, k_cache, v_cache, slots, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        positions_axis_stride(positions), cos.stride(0), sin.stride(0),
        **rotary_constants(q, k, positions, mrope_section, is_interleaved))
    return q
