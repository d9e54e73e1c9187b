"""LLaVA's and LLaVA-NeXT's configuration, read from an HF `config.json` (LlavaForConditionalGeneration,
LlavaNextForConditionalGeneration).

transformers before 5 saved only the fields that differ from its defaults (llava-1.5-7b-hf's
text_config holds six keys), so the defaults its config classes apply are filled in here first.
"""

from dataclasses import dataclass

from lightvlm.models.clip_config import CLIPVisionConfig
from lightvlm.models.text_config import TextConfig

# LlavaConfig / LlavaNextConfig: the vision tower they build when vision_config leaves a field out
LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "patch_size": 14, "image_size": 336}

# transformers' LlamaConfig / Qwen2Config defaults, for text configs saved sparse
TEXT_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6},
}

NEXT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def text_config(hf: dict) -> TextConfig:
    text = hf.get("text_config") or {}
    model_type = text.get("model_type", "llama")  # LlavaConfig's default text model
    return TextConfig.from_hf({**TEXT_DEFAULTS.get(model_type, {}), "model_type": model_type, **text},
                              hf.get("tie_word_embeddings"))


@dataclass(frozen=True)
class LlavaConfig:
    text: TextConfig
    vision: CLIPVisionConfig
    image_token_id: int
    projector_hidden_act: str
    projector_bias: bool
    feature_layers: tuple[int, ...]  # vision_feature_layer as a tuple (several are concatenated)
    select_strategy: str  # "default" drops the CLS token's row, "full" keeps it

    @classmethod
    def from_hf(cls, hf: dict) -> "LlavaConfig":
        return cls(**cls.fields_from_hf(hf))

    @staticmethod
    def fields_from_hf(hf: dict) -> dict:
        layer = hf.get("vision_feature_layer", -2)
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
        vision = CLIPVisionConfig.from_hf(hf.get("vision_config") or {}, LLAVA_VISION_DEFAULTS)
        layers = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
        for index in layers:
            vision.hidden_state_index(index)  # raises when out of range
        return dict(
            text=text_config(hf),
            vision=vision,
            image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            projector_bias=hf.get("multimodal_projector_bias", True),
            feature_layers=layers,
            select_strategy=strategy,
        )

    @property
    def tokens_per_crop(self) -> int:
        """Embedding rows one crop gives: one per patch, plus the CLS token's under 'full'."""
        return self.vision.patches_per_side**2 + (self.select_strategy == "full")


@dataclass(frozen=True)
class LlavaNextConfig(LlavaConfig):
    grid_pinpoints: tuple[tuple[int, int], ...] = NEXT_GRID_PINPOINTS  # (height, width) resolutions

    @classmethod
    def from_hf(cls, hf: dict) -> "LlavaNextConfig":
        fields = cls.fields_from_hf(hf)
        if fields["select_strategy"] != "default":
            # transformers folds each crop's rows into a patches x patches square, which the CLS row breaks
            raise ValueError("LLaVA-NeXT supports only vision_feature_select_strategy='default' with a CLIP tower")
        pinpoints = tuple(tuple(p) for p in hf.get("image_grid_pinpoints") or NEXT_GRID_PINPOINTS)
        crop = fields["vision"].image_size
        if any(len(p) != 2 or p[0] % crop or p[1] % crop for p in pinpoints):
            raise ValueError(f"image_grid_pinpoints {[list(p) for p in pinpoints]} must be (height, width) multiples "
                             f"of the vision tower's image_size {crop}")
        return cls(**fields, grid_pinpoints=pinpoints)
