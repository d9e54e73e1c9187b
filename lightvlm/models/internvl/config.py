"""InternVL's configuration, read from an HF `config.json` (InternVLForConditionalGeneration)."""

from dataclasses import dataclass

from lightvlm.models.text_config import TextConfig


@dataclass(frozen=True)
class InternVisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    qkv_bias: bool
    use_qk_norm: bool
    norm_type: str
    layer_norm_eps: float
    image_size: int
    patch_size: int
    num_channels: int
    use_mean_pooling: bool

    @classmethod
    def from_hf(cls, hf: dict) -> "InternVisionConfig":
        image_size, patch_size = _square(hf.get("image_size", 448)), _square(hf.get("patch_size", 14))
        return cls(
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_act", "gelu"),
            qkv_bias=hf.get("attention_bias", False),
            use_qk_norm=hf.get("use_qk_norm", False),
            norm_type=hf.get("norm_type", "layer_norm"),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
            image_size=image_size,
            patch_size=patch_size,
            num_channels=hf.get("num_channels", 3),
            use_mean_pooling=hf.get("use_mean_pooling", True),
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def _square(value) -> int:
    if isinstance(value, (list, tuple)):
        if value[0] != value[1]:
            raise ValueError(f"only square image and patch sizes are supported, got {value}")
        return value[0]
    return value


@dataclass(frozen=True)
class InternVLConfig:
    text: TextConfig
    vision: InternVisionConfig
    image_token_id: int
    downsample_ratio: float
    projector_hidden_act: str
    vision_feature_layer: int
    vision_feature_select_strategy: str

    @classmethod
    def from_hf(cls, hf: dict) -> "InternVLConfig":
        config = cls(
            text=TextConfig.from_hf(hf["text_config"], hf.get("tie_word_embeddings")),
            vision=InternVisionConfig.from_hf(hf["vision_config"]),
            image_token_id=hf.get("image_token_id", 151667),
            downsample_ratio=hf.get("downsample_ratio", 0.5),
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            vision_feature_layer=hf.get("vision_feature_layer", -1),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        )
        if config.vision.patches_per_side * config.downsample_ratio % 1:
            raise ValueError(f"{config.vision.patches_per_side} patches per side cannot be pixel-shuffled "
                             f"by downsample_ratio={config.downsample_ratio}")
        return config

    @property
    def shuffle_factor(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """What the vision geometry gives: (image_size / patch_size)^2 * downsample_ratio^2."""
        return (self.vision.patches_per_side // self.shuffle_factor) ** 2
