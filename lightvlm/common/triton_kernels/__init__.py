"""Triton kernels for the CUDA path. Each file holds one kernel and its plain-torch twin (`<kernel>_torch`,
same call signature), which the CPU path uses and the tests compare the kernel against (under
TRITON_INTERPRET=1 on the CPU). Importing a file needs no triton: without it only the twin works.

    context_attention             prefill attention over the token-indexed KV: cached prefix, GQA, varlen
    token_decode_attention        decode attention, one program per (request, head)
    token_decode_attention_split  the same, split-K (flash decoding) for long contexts
    copy_kv                       a step's K/V rows into the cache at their slots
    rotary                        rotary embedding in place, 1-D or M-RoPE (contiguous or interleaved)
    rotary_copy_kv                rotary fused with the K/V write
    rmsnorm                       rmsnorm, fused_add_rmsnorm (the residual add first)
    silu_and_mul                  the gated MLP's activation on [gate | up]
    embed_splice                  image-embedding rows over placeholder rows
    top_k_top_p                   top-k then top-p with per-row parameters, without a sort
"""
