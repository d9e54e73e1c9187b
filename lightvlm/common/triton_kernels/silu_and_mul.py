"""The gated MLP's activation on a fused [gate | up] projection.

    out = silu_and_mul(x)

x: [..., 2 * I] (gate in the first I columns, up in the last I; rows contiguous); returns
[..., I] = silu(gate) * up in x's dtype. The kernel rounds silu(gate) to x's dtype before the product,
as the torch twin's two ops do, so that both round the same way.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """The torch twin: transformers' gated MLP's `act_fn(gate) * up`, the product written over the
    activation's output."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # one temporary fewer: the activation's output takes the product


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < INTERMEDIATE
        gate = tl.load(x_ptr + row * stride_x + i, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + INTERMEDIATE + i, mask=mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + i, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): a program per (row, block of I)."""
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    assert rows.stride(1) == 1
    out = torch.empty(rows.shape[0], intermediate, dtype=x.dtype, device=x.device)
    block = min(block, triton.next_power_of_2(intermediate))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(intermediate, block))](
        rows, out, rows.stride(0), out.stride(0), INTERMEDIATE=intermediate, BLOCK=block)
    return out.view(*x.shape[:-1], intermediate)
