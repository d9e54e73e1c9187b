"""Write image-embedding rows over the placeholder rows of a step's token embeddings, in one launch.

    embeds = embed_splice(embeds, rows, image_embeds)

embeds: [T, H] (the step's token embeddings, rows contiguous); rows: [R] integer, distinct (the
placeholder rows, in any order); image_embeds: [R, H], any float dtype (cast to embeds' dtype).
Afterwards embeds[rows[r]] == image_embeds[r]. Writes in place and returns embeds.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch twin is all they use
    triton = None


def embed_splice_torch(embeds: torch.Tensor, rows: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """The torch twin: one index_copy_."""
    return embeds.index_copy_(0, rows, image_embeds.to(embeds.dtype))


if triton is not None:

    @triton.jit
    def _embed_splice_kernel(embeds_ptr, rows_ptr, image_ptr, stride_e, stride_i, HIDDEN: tl.constexpr,
                             BLOCK: tl.constexpr):
        r = tl.program_id(0)
        h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = h < HIDDEN
        row = tl.load(rows_ptr + r)
        values = tl.load(image_ptr + r * stride_i + h, mask=mask)
        tl.store(embeds_ptr + row * stride_e + h, values.to(embeds_ptr.dtype.element_ty), mask=mask)


def embed_splice(embeds: torch.Tensor, rows: torch.Tensor, image_embeds: torch.Tensor,
                 block: int = 1024) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1): a program per (image row, block)."""
    hidden = embeds.shape[1]
    assert embeds.stride(1) == 1 and image_embeds.stride(1) == 1 and image_embeds.shape == (rows.shape[0], hidden)
    block = min(block, triton.next_power_of_2(hidden))
    _embed_splice_kernel[(rows.shape[0], triton.cdiv(hidden, block))](
        embeds, rows, image_embeds, embeds.stride(0), image_embeds.stride(0), HIDDEN=hidden, BLOCK=block)
    return embeds
