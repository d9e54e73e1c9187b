"""The Qwen-VL line's configuration (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense), read from an HF `config.json`.

The three models share one shape: a ViT over 2 x patch x patch pixel cubes with 2-D rotary, merged
spatial_merge_size^2 patches at a time into the language model's rows, and an M-RoPE decoder. What
differs is tabled in VARIANTS; each `config.json` spells its vision fields its own way, so each has
its own reader. Both layouts are read: transformers >= 5 nests the language model in `text_config`,
the checkpoints on the Hub keep its fields at the top level.
"""

from dataclasses import dataclass, replace

from lightvlm.models.text_config import TextConfig


@dataclass(frozen=True)
class Variant:
    """What one model of the line fixes that its config.json does not state."""

    backbone: str  # TextConfig model_type of the language model
    rope_form: str  # models.layers.rotary.ROTARY_FORMS
    default_mrope_section: tuple[int, int, int]
    vision_norm: str  # "layer_norm" | "rms_norm", in the ViT blocks and the merger
    vision_mlp: str  # "plain" (fc1, act, fc2) | "gated" (act(gate) * up, down)
    default_vision_act: str
    patch_bias: bool  # the patch embedding's Conv3d has a bias
    head_dim_from_hidden: bool  # the decoder's head_dim is hidden_size / num_heads whatever config.json says
    default_head_dim: int | None = None  # transformers' default when config.json has none


VARIANTS: dict[str, Variant] = {
    "qwen2_vl": Variant("qwen2", "mrope", (16, 24, 24), "layer_norm", "plain", "quick_gelu", False, True),
    "qwen2_5_vl": Variant("qwen2", "mrope", (16, 24, 24), "rms_norm", "gated", "silu", False, True),
    "qwen3_vl": Variant("qwen3", "mrope_interleaved", (24, 20, 20), "layer_norm", "plain", "gelu_pytorch_tanh",
                        True, False, default_head_dim=128),
}


@dataclass(frozen=True)
class QwenVisionConfig:
    variant: str  # a key of VARIANTS
    depth: int
    hidden_size: int  # the ViT's width
    out_hidden_size: int  # the merger's output: the language model's hidden size
    num_heads: int
    intermediate_size: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    rope_theta: float
    window_size: int = 0  # Qwen2.5-VL: window attention in every block not in fullatt_block_indexes
    fullatt_block_indexes: tuple[int, ...] = ()
    num_position_embeddings: int = 0  # Qwen3-VL: learned positions, interpolated to each image's grid
    deepstack_visual_indexes: tuple[int, ...] = ()  # Qwen3-VL: blocks whose features feed the first LM layers
    tokens_per_second: int | None = None  # Qwen2.5-VL: M-RoPE temporal positions per second of video

    @property
    def kind(self) -> Variant:
        return VARIANTS[self.variant]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def has_windows(self) -> bool:
        return self.window_size > 0

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


def _vision_common(variant: str, hf: dict) -> dict:
    rope = hf.get("rope_parameters") or {}
    return dict(variant=variant, depth=hf["depth"], num_heads=hf["num_heads"],
                hidden_act=hf.get("hidden_act", VARIANTS[variant].default_vision_act),
                in_channels=hf.get("in_channels", hf.get("in_chans", 3)), patch_size=hf.get("patch_size", 14),
                temporal_patch_size=hf.get("temporal_patch_size", 2),
                spatial_merge_size=hf.get("spatial_merge_size", 2), rope_theta=float(rope.get("rope_theta", 10000.0)))


def qwen2_vision(hf: dict) -> QwenVisionConfig:
    width = hf["embed_dim"]
    return QwenVisionConfig(**_vision_common("qwen2_vl", hf), hidden_size=width, out_hidden_size=hf["hidden_size"],
                            intermediate_size=int(width * hf.get("mlp_ratio", 4)))


def qwen2_5_vision(hf: dict) -> QwenVisionConfig:
    return QwenVisionConfig(**_vision_common("qwen2_5_vl", hf), hidden_size=hf["hidden_size"],
                            out_hidden_size=hf["out_hidden_size"], intermediate_size=hf["intermediate_size"],
                            window_size=hf.get("window_size", 112),
                            fullatt_block_indexes=tuple(hf.get("fullatt_block_indexes", (7, 15, 23, 31))),
                            tokens_per_second=hf.get("tokens_per_second", 4))


def qwen3_vision(hf: dict) -> QwenVisionConfig:
    return QwenVisionConfig(**_vision_common("qwen3_vl", hf), hidden_size=hf["hidden_size"],
                            out_hidden_size=hf["out_hidden_size"], intermediate_size=hf["intermediate_size"],
                            num_position_embeddings=hf.get("num_position_embeddings", 2304),
                            deepstack_visual_indexes=tuple(hf.get("deepstack_visual_indexes", (8, 16, 24))))


VISION_READERS = {"qwen2_vl": qwen2_vision, "qwen2_5_vl": qwen2_5_vision, "qwen3_vl": qwen3_vision}


@dataclass(frozen=True)
class QwenVLConfig:
    text: TextConfig
    vision: QwenVisionConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    @property
    def embedding_width(self) -> int:
        """An image row carries its embedding and, for DeepStack, one feature per fed layer: [H * (1 + k)]."""
        return self.text.hidden_size * (1 + self.num_deepstack)

    @classmethod
    def read(cls, variant: str, hf: dict) -> "QwenVLConfig":
        kind = VARIANTS[variant]
        text_hf = hf.get("text_config") or hf  # Hub checkpoints keep the text fields at the top level
        tie = hf.get("tie_word_embeddings", text_hf.get("tie_word_embeddings"))
        text = TextConfig.from_hf(text_hf, tie, model_type=kind.backbone, rope_form=kind.rope_form)
        if kind.head_dim_from_hidden:
            text = replace(text, head_dim=text.hidden_size // text.num_heads)
        elif kind.default_head_dim and not text_hf.get("head_dim"):
            text = replace(text, head_dim=kind.default_head_dim)
        if not text.mrope_section:
            text = replace(text, mrope_section=kind.default_mrope_section)
        if len(text.mrope_section) != 3 or sum(text.mrope_section) != text.head_dim // 2:
            raise ValueError(f"mrope_section {list(text.mrope_section)} must be three numbers adding up to "
                             f"head_dim / 2 = {text.head_dim // 2}")
        vision = VISION_READERS[variant](hf["vision_config"])
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"the vision merger gives rows of {vision.out_hidden_size} but the language model's "
                             f"hidden_size is {text.hidden_size}")
        if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
            raise ValueError(f"vision hidden_size {vision.hidden_size} over {vision.num_heads} heads must give a "
                             "head_dim divisible by 4 (2-D rotary over height and width)")
        indexes = (*vision.fullatt_block_indexes, *vision.deepstack_visual_indexes)
        bad = [i for i in indexes if not 0 <= i < vision.depth]
        if bad:
            raise ValueError(f"vision block indexes {bad} are outside the {vision.depth} blocks")
        if vision.num_position_embeddings and round(vision.num_position_embeddings**0.5) ** 2 != \
                vision.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {vision.num_position_embeddings} is not a square")
        return cls(text=text, vision=vision, image_token_id=hf.get("image_token_id", 151655),
                   vision_start_token_id=hf.get("vision_start_token_id", 151652),
                   vision_end_token_id=hf.get("vision_end_token_id", 151653))

    @classmethod
    def qwen2_vl(cls, hf: dict) -> "QwenVLConfig":
        return cls.read("qwen2_vl", hf)

    @classmethod
    def qwen2_5_vl(cls, hf: dict) -> "QwenVLConfig":
        return cls.read("qwen2_5_vl", hf)

    @classmethod
    def qwen3_vl(cls, hf: dict) -> "QwenVLConfig":
        return cls.read("qwen3_vl", hf)
