"""What a decoder needs from a Hugging Face text config (`config.json` or its `text_config`). No torch."""

from dataclasses import dataclass

# What a backbone fixes that its config.json does not state (the rest is read from the config).
# `attention_bias` names the config key that switches the q/k/v and o biases on, with its default.
BACKBONES: dict[str, dict] = {
    "qwen2": {"qkv_bias": True, "o_bias": False},
    "llama": {},
    "qwen3": {"qk_norm": True},  # RMSNorm over each head's q and k before rotary
    # InternLM2 is Llama with other tensor names (models/decoder_weights.py) and its q/k/v fused per KV
    # head in `wqkv` (unpacked at load time); `bias` (true by default) puts biases on wqkv and wo.
    "internlm2": {"attention_bias": ("bias", True)},
}


@dataclass(frozen=True)
class TextConfig:
    """What the decoder needs from a Hugging Face text config (`config.json` or its `text_config`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    qk_norm: bool = False
    rope_form: str = "1d"  # models.layers.rotary.ROTARY_FORMS: "1d", "mrope", "mrope_interleaved"
    mrope_section: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict, tie_word_embeddings: bool | None = None, **overrides) -> "TextConfig":
        """`overrides` are what the family knows better than the dict (its rope form, a model type)."""
        model_type = overrides.pop("model_type", hf.get("model_type", "llama"))
        if model_type not in BACKBONES:
            raise ValueError(f"unsupported language model type {model_type!r}; supported: {', '.join(BACKBONES)}")
        if hf.get("use_sliding_window"):
            raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type") == "mrope":  # transformers reads it as the default scaling with sections
            rope["rope_type"] = "default"
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        num_heads = hf["num_attention_heads"]
        backbone = BACKBONES[model_type]
        bias_key, bias_default = backbone.get("attention_bias", ("attention_bias", False))
        attention_bias = hf.get(bias_key, bias_default)
        if tie_word_embeddings is None:
            tie_word_embeddings = hf.get("tie_word_embeddings", False)
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            hidden_act=hf.get("hidden_act", "silu"),
            qkv_bias=backbone.get("qkv_bias", attention_bias),
            o_bias=backbone.get("o_bias", attention_bias),
            mlp_bias=hf.get("mlp_bias", False),
            qk_norm=backbone.get("qk_norm", False),
            tie_word_embeddings=tie_word_embeddings,
            mrope_section=tuple(rope.get("mrope_section", ())),
        )
        fields.update(overrides)
        return cls(**fields)
