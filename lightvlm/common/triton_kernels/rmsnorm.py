"""RMSNorm, and RMSNorm fused with the residual add before it.

    out = rmsnorm(x, weight, eps)
    out, summed = fused_add_rmsnorm(x, residual, weight, eps)

x, residual: [..., H] (rows contiguous in H); weight: [H]. As the HF models (and `layers.norm.RMSNorm`)
compute it: the mean square and the scaling in fp32, the normalized row cast back to x's dtype, then
`weight * normalized` (in the promoted dtype of weight and x). The fused form first adds
`summed = x + residual` in x's dtype (the decoder's residual stream) and normalizes that; it returns
both, so the layer reads its residual stream once instead of three times.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch twin: `RMSNorm.forward`'s arithmetic."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def fused_add_rmsnorm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin: the add, then `rmsnorm_torch`; returns (normalized, summed)."""
    summed = x + residual
    return rmsnorm_torch(summed, weight, eps), summed


if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, eps, stride_x, stride_r, stride_o,
                        stride_s, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0)
        h = tl.arange(0, BLOCK)
        mask = h < HIDDEN
        x = tl.load(x_ptr + row * stride_x + h, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # the sum is rounded to x's dtype, as the residual stream holds it
            x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + h, mask=mask, other=0.0).to(tl.float32))
            x = x.to(summed_ptr.dtype.element_ty)
            tl.store(summed_ptr + row * stride_s + h, x, mask=mask)
        x_dtype = x.dtype
        x = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
        normalized = (x * rstd).to(x_dtype).to(tl.float32)  # cast back first, as HF does
        weight = tl.load(weight_ptr + h, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + h, (weight * normalized).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    assert rows.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = torch.empty_like(rows) if residual is not None else None
    residual_rows = residual.reshape(-1, hidden) if residual is not None else None
    block = triton.next_power_of_2(hidden)
    _rmsnorm_kernel[(rows.shape[0],)](
        rows, residual_rows, weight, out, summed, eps, rows.stride(0),
        residual_rows.stride(0) if residual is not None else 0, out.stride(0),
        summed.stride(0) if residual is not None else 0,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=min(max(block // 512, 1), 16))
    return out.view(x.shape), summed.view(x.shape) if summed is not None else None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): one program per row."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): one program per row."""
    assert residual.shape == x.shape and residual.dtype == x.dtype
    return _launch(x, residual, weight, eps)
