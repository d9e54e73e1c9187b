"""Checkpoint names of a decoder's tensors -> the names of `models/layers/decoder.py`. No torch.

Qwen2, Qwen3 and Llama checkpoints already use our names. InternLM2 names the same tensors otherwise,
and fuses q/k/v into one `wqkv` tensor grouped per KV head; that one keeps a name of its own
(`self_attn.wqkv`) so that the weight loader knows to unpack it (weight_loader.STACKED_PARAMS). The
names do not overlap, so one table serves every backbone.
"""

# InternLM2 (modeling_internlm2.py) -> ours; applied to the name below the model prefix
INTERNLM2_NAMES = (
    ("tok_embeddings.", "embed_tokens."),
    (".attention.wqkv.", ".self_attn.wqkv."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)

# the LM head under its checkpoint names (InternLM2 calls it `output`)
HEAD_NAMES = ("lm_head.", "output.")


def decoder_name(name: str) -> str:
    """A tensor name below the decoder's prefix (`embed_tokens.weight`, `layers.3.attention.wo.weight`)
    -> ours (`embed_tokens.weight`, `layers.3.self_attn.o_proj.weight`)."""
    for theirs, ours in INTERNLM2_NAMES:
        if theirs in name:
            return name.replace(theirs, ours, 1)
    return name


def head_name(name: str) -> str | None:
    """`lm_head.weight` or `output.weight` -> `lm_head.weight`; None for anything else."""
    for prefix in HEAD_NAMES:
        if name.startswith(prefix):
            return "lm_head." + name.removeprefix(prefix)
    return None
