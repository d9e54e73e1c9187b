"""What a CLIP vision tower needs from a Hugging Face `vision_config` (model_type clip_vision_model). No torch.

Older transformers wrote only the fields that differ from the defaults, so a family passes the
defaults its own HF config class applies (LLaVA's differ from CLIP's own), and the rest fall back to
CLIPVisionConfig's.
"""

from dataclasses import dataclass

# transformers' CLIPVisionConfig defaults
CLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, hf: dict, defaults: dict | None = None) -> "CLIPVisionConfig":
        model_type = hf.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ValueError(f"unsupported vision tower {model_type!r}; supported: clip_vision_model")
        values = {**CLIP_VISION_DEFAULTS, **(defaults or {}), **hf}
        config = cls(
            hidden_size=values["hidden_size"],
            intermediate_size=values["intermediate_size"],
            num_layers=values["num_hidden_layers"],
            num_heads=values["num_attention_heads"],
            num_channels=values["num_channels"],
            image_size=_square(values["image_size"], "image_size"),
            patch_size=_square(values["patch_size"], "patch_size"),
            hidden_act=values["hidden_act"],
            layer_norm_eps=values["layer_norm_eps"],
        )
        if config.image_size % config.patch_size:
            raise ValueError(f"vision_config: image_size {config.image_size} is not a multiple of patch_size "
                             f"{config.patch_size}")
        return config

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.patches_per_side**2 + 1  # + the CLS token

    def hidden_state_index(self, layer: int) -> int:
        """A `vision_feature_layer` (negative counts from the end) -> an index into the hidden states
        (0 = the embeddings, i = the output of layer i)."""
        num_states = self.num_layers + 1
        if not -num_states <= layer < num_states:
            raise ValueError(f"vision_feature_layer {layer} is out of range for a {self.num_layers}-layer tower")
        return layer % num_states


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision_config: only a square {name} is supported, got {value}")
        return value[0]
    return value
