"""Which implementation of each op a device runs: the Triton kernel on CUDA, its torch twin elsewhere.

This is the one place that decides. A call site asks `ops_for(tensor.device).<op>(...)`; the table
below is resolved once per device type (cached), so no call site tests the device itself.

    op                      CUDA (Triton)             CPU (torch twin)
    context_attention       context_attention         context_attention_torch   prefill chunks, cached prefix
    token_decode_attention  token_decode_attention    token_decode_attention_torch
    copy_kv                 copy_kv                   copy_kv_torch             the step's K/V into the cache
    rotary                  rotary                    rotary_torch              in place, 1-D positions
    rmsnorm                 rmsnorm                   rmsnorm_torch
    fused_add_rmsnorm       fused_add_rmsnorm         fused_add_rmsnorm_torch   residual add + norm
    silu_and_mul            silu_and_mul              silu_and_mul_torch
    embed_splice            embed_splice              embed_splice_torch        image rows over placeholders
    top_k_top_p             top_k_top_p               top_k_top_p_torch         the sampler's filters

Call sites: `InferState.attention` (copy_kv, token_decode_attention, context_attention), the decoder
layers (rmsnorm, fused_add_rmsnorm, rotary, silu_and_mul), `CausalLM.embed` (embed_splice) and the
sampler (top_k_top_p). Each twin computes what the engine's CPU code computed before the table existed
(the twins' tests hold them bit for bit to transformers' layers where parity needs it), so the CPU
path stays token-exact. A CUDA machine without triton runs the twins too. Not in the table:
`token_decode_attention_split` (split-K), which the decode kernel itself runs for small batches with
long slot tables (`token_decode_attention.uses_split`), and `rotary_copy_kv` (rotary fused into the KV
write), which no call site uses: rotary runs in the model and the KV write in the engine's InferState,
two sides the model/engine seam keeps apart.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache

import torch

from lightvlm.common.triton_kernels import (
    context_attention,
    copy_kv,
    embed_splice,
    rmsnorm,
    rotary,
    silu_and_mul,
    token_decode_attention,
    top_k_top_p,
)


@dataclass(frozen=True)
class Ops:
    """One implementation per op; the Triton kernels and their twins share each signature."""

    context_attention: Callable
    token_decode_attention: Callable
    copy_kv: Callable
    rotary: Callable
    rmsnorm: Callable
    fused_add_rmsnorm: Callable
    silu_and_mul: Callable
    embed_splice: Callable
    top_k_top_p: Callable


# op name -> the module (one file of triton_kernels/) holding the kernel `<op>` and its twin `<op>_torch`
MODULES = {
    "context_attention": context_attention,
    "token_decode_attention": token_decode_attention,
    "copy_kv": copy_kv,
    "rotary": rotary,
    "rmsnorm": rmsnorm,
    "fused_add_rmsnorm": rmsnorm,
    "silu_and_mul": silu_and_mul,
    "embed_splice": embed_splice,
    "top_k_top_p": top_k_top_p,
}

KERNELS = Ops(**{op: getattr(module, op) for op, module in MODULES.items()})
TWINS = Ops(**{op: getattr(module, f"{op}_torch") for op, module in MODULES.items()})
assert {f.name for f in fields(Ops)} == MODULES.keys()


def select_ops(device_type: str, has_triton: bool) -> Ops:
    """The table's rule: the kernels on CUDA when triton is installed, the twins everywhere else."""
    return KERNELS if device_type == "cuda" and has_triton else TWINS


def triton_installed() -> bool:
    return token_decode_attention.triton is not None


@cache
def _ops_for_type(device_type: str) -> Ops:
    return select_ops(device_type, triton_installed())


def ops_for(device: torch.device) -> Ops:
    """The ops for tensors on `device` (decided once per device type)."""
    return _ops_for_type(device.type)
