"""Rotary position embedding (rotate-half form) on q and k; 1-D positions or M-RoPE.

    q, k = rotary(q, k, positions, cos, sin, mrope_section=None, is_interleaved=False)

q: [T, heads, D], k: [T, kv_heads, D] (any row and head strides, e.g. views of a fused qkv
projection); returns the rotated q and k: the kernel rotates them in place, the twin returns new
tensors (copying back would cost the CPU one more pass), so callers use what is returned.
cos, sin: [max_positions, D] tables (row p = the angles of position p, both halves repeating the
D / 2 frequencies, as `RotaryEmbedding` builds them). Each row t becomes
x * cos[p] + rotate_half(x) * sin[p], rotate_half(x) = [-x[D/2:], x[:D/2]].

positions: [T] integer (one position per row), or [3, T] for M-RoPE (temporal, height, width), where
`mrope_section` (summing to D / 2, e.g. [16, 24, 24]) says which of the three positions each of the
D / 2 frequencies takes, the second half of D following the first:
- contiguous sections (Qwen2-VL, Qwen2.5-VL; is_interleaved=False): the first mrope_section[0]
  frequencies use the temporal position, the next mrope_section[1] the height, the rest the width;
- interleaved (Qwen3-VL; is_interleaved=True): frequency j uses the height if j % 3 == 1 and
  j < 3 * mrope_section[1], the width if j % 3 == 2 and j < 3 * mrope_section[2], else the temporal.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def mrope_axes(head_dim: int, mrope_section: list[int], is_interleaved: bool) -> torch.Tensor:
    """[head_dim] long: which row of the [3, T] positions each of the head's columns takes."""
    half = head_dim // 2
    if len(mrope_section) != 3 or sum(mrope_section) != half:
        raise ValueError(f"mrope_section {mrope_section} must be 3 sections summing to head_dim / 2 = {half}")
    if is_interleaved:
        j = torch.arange(half)
        axes = torch.zeros(half, dtype=torch.long)
        axes[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
        axes[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    else:
        axes = torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
    return torch.cat((axes, axes))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_angles(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mrope_section: list[int] | None,
                  is_interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cos and sin: [T, D], gathered from the tables by 1-D or M-RoPE positions."""
    if positions.dim() == 1:
        return cos[positions], sin[positions]
    if mrope_section is None:
        raise ValueError("[3, T] positions need an mrope_section")
    axes = mrope_axes(cos.shape[1], mrope_section, is_interleaved).to(positions.device)
    # each column from the row of its axis' position: three whole-row gathers, then one along the
    # axes (indexing cos[row, column] pair by pair is some 50 times slower on the CPU)
    axes = axes[None, None, :].expand(1, positions.shape[1], -1)
    return cos[positions].gather(0, axes)[0], sin[positions].gather(0, axes)[0]


def rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mrope_section: list[int] | None = None, is_interleaved: bool = False):
    """The torch twin: in q's dtype, as transformers' apply_rotary_pos_emb computes it (cos and sin cast
    first); new tensors, q and k untouched."""
    row_cos, row_sin = rotary_angles(positions, cos, sin, mrope_section, is_interleaved)
    row_cos, row_sin = row_cos.unsqueeze(1).to(q.dtype), row_sin.unsqueeze(1).to(q.dtype)
    return q * row_cos + rotate_half(q) * row_sin, k * row_cos + rotate_half(k) * row_sin


if triton is not None:

    @triton.jit
    def _row_angles(positions_ptr, stride_axis, t, cos_ptr, sin_ptr, stride_cos, stride_sin,
                    HALF: tl.constexpr, HALF_POW2: tl.constexpr, IS_MROPE: tl.constexpr,
                    IS_INTERLEAVED: tl.constexpr, SECTION_T: tl.constexpr, SECTION_H: tl.constexpr,
                    SECTION_W: tl.constexpr):
        """Row t's cos and sin for the first and the second half of the head: four [HALF_POW2] fp32."""
        j = tl.arange(0, HALF_POW2)  # frequency index
        in_half = j < HALF
        axis = tl.zeros([HALF_POW2], tl.int32)
        if IS_MROPE:
            if IS_INTERLEAVED:
                axis = tl.where((j % 3 == 1) & (j < 3 * SECTION_H), 1, axis)
                axis = tl.where((j % 3 == 2) & (j < 3 * SECTION_W), 2, axis)
            else:
                axis = (j >= SECTION_T).to(tl.int32) + (j >= SECTION_T + SECTION_H).to(tl.int32)
        position = tl.load(positions_ptr + axis * stride_axis + t, mask=in_half, other=0)
        cos_lo = tl.load(cos_ptr + position * stride_cos + j, mask=in_half, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + position * stride_cos + HALF + j, mask=in_half, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + position * stride_sin + j, mask=in_half, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + position * stride_sin + HALF + j, mask=in_half, other=0.0).to(tl.float32)
        return cos_lo, cos_hi, sin_lo, sin_hi

    @triton.jit
    def _rotate_heads(row_ptr, stride_h, NUM_HEADS: tl.constexpr, HEADS_POW2: tl.constexpr, HALF: tl.constexpr,
                      HALF_POW2: tl.constexpr, cos_lo, cos_hi, sin_lo, sin_hi):
        """One row's heads rotated: the two halves as [HEADS_POW2, HALF_POW2] fp32, their offsets, mask."""
        h = tl.arange(0, HEADS_POW2)[:, None]
        j = tl.arange(0, HALF_POW2)[None, :]
        offsets = h * stride_h + j
        mask = (h < NUM_HEADS) & (j < HALF)
        lo = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(row_ptr + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
        new_lo = lo * cos_lo[None, :] - hi * sin_lo[None, :]
        new_hi = hi * cos_hi[None, :] + lo * sin_hi[None, :]
        return new_lo, new_hi, offsets, mask

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                       stride_axis, stride_cos, stride_sin, HEADS: tl.constexpr, HEADS_POW2: tl.constexpr,
                       KV_HEADS: tl.constexpr, KV_HEADS_POW2: tl.constexpr, HALF: tl.constexpr,
                       HALF_POW2: tl.constexpr, IS_MROPE: tl.constexpr, IS_INTERLEAVED: tl.constexpr,
                       SECTION_T: tl.constexpr, SECTION_H: tl.constexpr, SECTION_W: tl.constexpr):
        t = tl.program_id(0)
        cos_lo, cos_hi, sin_lo, sin_hi = _row_angles(positions_ptr, stride_axis, t, cos_ptr, sin_ptr, stride_cos,
                                                     stride_sin, HALF, HALF_POW2, IS_MROPE, IS_INTERLEAVED,
                                                     SECTION_T, SECTION_H, SECTION_W)
        q_row = q_ptr + t * stride_qt
        lo, hi, offsets, mask = _rotate_heads(q_row, stride_qh, HEADS, HEADS_POW2, HALF, HALF_POW2,
                                              cos_lo, cos_hi, sin_lo, sin_hi)
        tl.store(q_row + offsets, lo.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(q_row + offsets + HALF, hi.to(q_ptr.dtype.element_ty), mask=mask)
        k_row = k_ptr + t * stride_kt
        lo, hi, offsets, mask = _rotate_heads(k_row, stride_kh, KV_HEADS, KV_HEADS_POW2, HALF, HALF_POW2,
                                              cos_lo, cos_hi, sin_lo, sin_hi)
        tl.store(k_row + offsets, lo.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_row + offsets + HALF, hi.to(k_ptr.dtype.element_ty), mask=mask)


def rotary_constants(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, mrope_section: list[int] | None,
                     is_interleaved: bool) -> dict:
    """The compile-time constants the rotary kernels share (head counts, half dims, M-RoPE sections)."""
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    is_mrope = positions.dim() == 2
    if is_mrope:
        if mrope_section is None:
            raise ValueError("[3, T] positions need an mrope_section")
        mrope_axes(dim, mrope_section, is_interleaved)  # validates the sections
    section = mrope_section if is_mrope else (0, 0, 0)
    return dict(HEADS=heads, HEADS_POW2=triton.next_power_of_2(heads), KV_HEADS=kv_heads,
                KV_HEADS_POW2=triton.next_power_of_2(kv_heads), HALF=dim // 2,
                HALF_POW2=triton.next_power_of_2(dim // 2), IS_MROPE=is_mrope, IS_INTERLEAVED=is_interleaved,
                SECTION_T=section[0], SECTION_H=section[1], SECTION_W=section[2])


def positions_axis_stride(positions: torch.Tensor) -> int:
    """The stride between the rows of [3, T] positions; 0 for 1-D positions (every axis reads row 0)."""
    assert positions.stride(-1) == 1
    return positions.stride(0) if positions.dim() == 2 else 0


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           mrope_section: list[int] | None = None, is_interleaved: bool = False):
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): one program per row, all its q
    and k heads; fp32 inside, one rounding to q's dtype."""
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        positions_axis_stride(positions), cos.stride(0), sin.stride(0),
        **rotary_constants(q, k, positions, mrope_section, is_interleaved))
    return q, k
