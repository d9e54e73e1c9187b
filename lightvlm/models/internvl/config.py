"""InternVL's configuration, from either layout of `config.json`:

- transformers' (`InternVLForConditionalGeneration`): `text_config`, `vision_config` with transformers'
  key names, `vision_feature_layer`, `image_token_id`;
- OpenGVLab's original (`InternVLChatModel`, what `--trust_remote_code` checkpoints are): `llm_config`
  (an InternLM2, Qwen2 or Llama config), `vision_config` of InternViT (`qk_normalization`, `qkv_bias`),
  `select_layer`, `ps_version`, and the tiling keys (`force_image_size`, `min_dynamic_patch`, ...).

Defaults for keys a folder leaves out are those of the class that wrote it (transformers'
InternVLConfig, OpenGVLab's InternVLChatConfig / InternVisionConfig).
"""

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
    qk_norm_eps: float = 1e-6  # transformers' qk-norm ignores layer_norm_eps; InternViT's own uses it

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

    @classmethod
    def from_original(cls, hf: dict) -> "InternVisionConfig":
        """OpenGVLab's InternVisionConfig (`model_type: intern_vit_6b` for every size). InternViT has no
        final norm: the last layer's output goes to the projector as it is."""
        eps = hf.get("layer_norm_eps", 1e-6)
        return cls(
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            hidden_act=hf.get("hidden_act", "gelu"),
            qkv_bias=hf.get("qkv_bias", False),
            use_qk_norm=hf.get("qk_normalization", True),
            norm_type=hf.get("norm_type", "rms_norm"),
            layer_norm_eps=eps,
            image_size=_square(hf.get("image_size", 224)),
            patch_size=_square(hf.get("patch_size", 14)),
            num_channels=hf.get("num_channels", 3),
            use_mean_pooling=True,
            qk_norm_eps=eps,
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
class TileSettings:
    """How the original layout's config.json says images are tiled (its training/eval keys): what the
    processor uses where the folder has no transformers-written image processor settings."""

    tile_size: int  # force_image_size, else vision_config.image_size
    min_tiles: int  # min_dynamic_patch
    max_tiles: int  # max_dynamic_patch
    use_thumbnail: bool
    dynamic: bool  # dynamic_image_size: false means one tile, the whole image resized

    @classmethod
    def from_original(cls, hf: dict, tile_size: int) -> "TileSettings":
        return cls(tile_size=tile_size, min_tiles=hf.get("min_dynamic_patch", 1),
                   max_tiles=hf.get("max_dynamic_patch", 6), use_thumbnail=hf.get("use_thumbnail", False),
                   dynamic=hf.get("dynamic_image_size", False))


# llm_config.architectures[0] of an original folder -> the backbone (text_config.BACKBONES)
ORIGINAL_LANGUAGE_MODELS = {
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
PIXEL_SHUFFLES = ("v1", "v2")  # see model.pixel_shuffle


@dataclass(frozen=True)
class InternVLConfig:
    text: TextConfig
    vision: InternVisionConfig
    image_token_id: int | None  # None: the original layout names it only in the tokenizer (filled at open)
    downsample_ratio: float
    projector_hidden_act: str
    vision_feature_layer: int
    vision_feature_select_strategy: str
    ps_version: str = "v2"
    layout: str = "hf"  # "hf" (transformers) or "original" (OpenGVLab)
    tiling: TileSettings | None = None  # the original layout's tiling keys

    @classmethod
    def from_hf(cls, hf: dict) -> "InternVLConfig":
        return cls(
            text=TextConfig.from_hf(hf["text_config"], hf.get("tie_word_embeddings")),
            vision=InternVisionConfig.from_hf(hf["vision_config"]),
            image_token_id=hf.get("image_token_id", 151667),
            downsample_ratio=hf.get("downsample_ratio", 0.5),
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            vision_feature_layer=hf.get("vision_feature_layer", -1),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        ).checked()

    @classmethod
    def from_original(cls, hf: dict) -> "InternVLConfig":
        for key in ("use_backbone_lora", "use_llm_lora"):
            if hf.get(key):
                raise ValueError(f"{key}={hf[key]}: InternVL checkpoints with LoRA adapters are not supported; "
                                 "merge the adapters into the weights first")
        llm = hf["llm_config"]
        architecture = (llm.get("architectures") or [None])[0]
        if architecture not in ORIGINAL_LANGUAGE_MODELS:
            raise ValueError(f"llm_config.architectures[0] is {architecture!r}; supported language models of "
                             f"InternVLChatModel: {', '.join(ORIGINAL_LANGUAGE_MODELS)}")
        vision = InternVisionConfig.from_original(hf["vision_config"])
        forced = hf.get("force_image_size")
        if forced and forced != vision.image_size:
            raise ValueError(f"force_image_size is {forced} but vision_config.image_size is {vision.image_size}: "
                             "the position embeddings are for the latter; lightvlm does not interpolate them")
        ps_version = hf.get("ps_version", "v1")  # InternVLChatConfig's default
        if ps_version not in PIXEL_SHUFFLES:
            raise ValueError(f"unknown ps_version {ps_version!r}; supported: {', '.join(PIXEL_SHUFFLES)}")
        return cls(
            # InternVLChatModel always unties the head (it sets llm_config.tie_word_embeddings = False)
            text=TextConfig.from_hf(llm, tie_word_embeddings=False, model_type=ORIGINAL_LANGUAGE_MODELS[architecture]),
            vision=vision,
            image_token_id=None,
            downsample_ratio=hf.get("downsample_ratio", 0.5),
            projector_hidden_act="gelu",  # mlp1 is LayerNorm, Linear, nn.GELU(), Linear
            vision_feature_layer=hf.get("select_layer", -1),
            vision_feature_select_strategy="default",  # the CLS token is always dropped
            ps_version=ps_version,
            layout="original",
            tiling=TileSettings.from_original(hf, vision.image_size),
        ).checked()

    def checked(self) -> "InternVLConfig":
        if self.vision.patches_per_side * self.downsample_ratio % 1:
            raise ValueError(f"{self.vision.patches_per_side} patches per side cannot be pixel-shuffled "
                             f"by downsample_ratio={self.downsample_ratio}")
        return self

    @property
    def shuffle_factor(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """What the vision geometry gives: (image_size / patch_size)^2 * downsample_ratio^2."""
        return (self.vision.patches_per_side // self.shuffle_factor) ** 2
