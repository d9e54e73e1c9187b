"""Random-weight Qwen-VL checkpoints (the HF layout) for tests and the demo server:
`python -m lightvlm.models.demo --arch qwen2_vl|qwen2_5_vl|qwen3_vl [--size tiny]`.

`hf_config`, `build_tokenizer` and `image_processor` are also what the tests' reference builder uses
to have transformers itself write checkpoints of other shapes.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from lightvlm.models.demo_kit import TextSpec, hf_parameter_shapes, save_weights, write_json
from lightvlm.models.demo_kit import build_tokenizer as build_bpe_tokenizer

ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}
PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template (a default system prompt; each image and each video as start, pad, end).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's (no default system prompt; text parts read by key).
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {"qwen2_vl": QWEN2_VL_TEMPLATE, "qwen2_5_vl": QWEN2_VL_TEMPLATE, "qwen3_vl": QWEN3_VL_TEMPLATE}


@dataclass(frozen=True)
class QwenSpec:
    variant: str
    text: TextSpec
    mrope_section: tuple[int, int, int]
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    patch_size: int
    min_pixels: int
    max_pixels: int
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()


def _tiny(variant: str, backbone: str, **vision) -> QwenSpec:
    head_dim = 32 if backbone == "qwen3" else None  # Qwen3 states its own (transformers' default is 128)
    text = TextSpec(backbone=backbone, vocab_target=700, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, initializer_range=0.1, tie_word_embeddings=True, rope_theta=10_000.0,
                    head_dim=head_dim)
    factor = vision.get("patch_size", 14) * 2
    section = (6, 5, 5) if head_dim else (2, 3, 3)
    return QwenSpec(variant, text, section, vision_hidden=32, vision_depth=2, vision_heads=2,
                    vision_intermediate=64, min_pixels=factor * factor * 4, max_pixels=factor * factor * 64, **vision)


# Under 1M parameters each, for tests: 4 to 64 image rows.
TINY: dict[str, QwenSpec] = {
    "qwen2_vl": _tiny("qwen2_vl", "qwen2", patch_size=14),
    "qwen2_5_vl": _tiny("qwen2_5_vl", "qwen2", patch_size=14, window_size=56, fullatt_block_indexes=(1,)),
    "qwen3_vl": _tiny("qwen3_vl", "qwen3", patch_size=16, num_position_embeddings=16,
                      deepstack_visual_indexes=(0, 1)),
}


def build_tokenizer(spec: QwenSpec):
    return build_bpe_tokenizer(spec.text, SPECIAL_TOKENS, {}, TEMPLATES[spec.variant])


# How each model spells its vision config (and the text settings only it has), as its checkpoints do.
def _qwen2_vision(spec: QwenSpec) -> dict:
    return {"model_type": "qwen2_vl_vision", "embed_dim": spec.vision_hidden, "hidden_size": spec.text.hidden_size,
            "mlp_ratio": spec.vision_intermediate // spec.vision_hidden, "hidden_act": "quick_gelu"}


def _qwen2_5_vision(spec: QwenSpec) -> dict:
    return {"model_type": "qwen2_5_vl_vision", "hidden_size": spec.vision_hidden,
            "out_hidden_size": spec.text.hidden_size, "intermediate_size": spec.vision_intermediate,
            "hidden_act": "silu", "window_size": spec.window_size,
            "fullatt_block_indexes": list(spec.fullatt_block_indexes), "tokens_per_second": 2}


def _qwen3_vision(spec: QwenSpec) -> dict:
    return {"model_type": "qwen3_vl_vision", "hidden_size": spec.vision_hidden,
            "out_hidden_size": spec.text.hidden_size, "intermediate_size": spec.vision_intermediate,
            "hidden_act": "gelu_pytorch_tanh", "num_position_embeddings": spec.num_position_embeddings,
            "deepstack_visual_indexes": list(spec.deepstack_visual_indexes)}


CLIP_NORM = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
HALF_NORM = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
# variant -> (vision config writer, extra text config, extra rope parameters, image mean and std)
SPELLINGS = {
    "qwen2_vl": (_qwen2_vision, {"use_sliding_window": False}, {}, CLIP_NORM),
    "qwen2_5_vl": (_qwen2_5_vision, {"use_sliding_window": False}, {}, CLIP_NORM),
    "qwen3_vl": (_qwen3_vision, {}, {"mrope_interleaved": True}, HALF_NORM),
}


def vision_config(spec: QwenSpec) -> dict:
    common = {"depth": spec.vision_depth, "num_heads": spec.vision_heads, "in_channels": 3,
              "patch_size": spec.patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "initializer_range": spec.text.initializer_range}
    return {**common, **SPELLINGS[spec.variant][0](spec)}


def hf_config(spec: QwenSpec, tokenizer) -> dict:
    """config.json of the model (transformers 5's nested layout)."""
    t = spec.text
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    _, text_extra, rope_extra, _ = SPELLINGS[spec.variant]
    rope = {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(spec.mrope_section),
            **rope_extra}
    text = {"model_type": f"{spec.variant}_text", "vocab_size": len(tokenizer), "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings, "initializer_range": t.initializer_range,
            "rms_norm_eps": 1e-6, "rope_parameters": rope, "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id, **text_extra}
    if t.head_dim is not None:
        text["head_dim"] = t.head_dim
    return {"model_type": spec.variant, "architectures": [ARCHITECTURES[spec.variant]], "text_config": text,
            "vision_config": vision_config(spec), "tie_word_embeddings": t.tie_word_embeddings,
            "initializer_range": t.initializer_range, **ids}


def image_processor(spec: QwenSpec):
    from transformers import Qwen2VLImageProcessorPil

    mean, std = SPELLINGS[spec.variant][3]
    return Qwen2VLImageProcessorPil(size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
                                    patch_size=spec.patch_size, temporal_patch_size=2, merge_size=2,
                                    image_mean=mean, image_std=std)


def generation_config(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id})}


@dataclass(frozen=True)
class Builder:
    """models/demo.py's interface for one model of the line: SPECS keyed (size, backbone) and build()."""

    variant: str

    @property
    def SPECS(self) -> dict[tuple[str, str], QwenSpec]:  # noqa: N802 (the name models/demo.py looks up)
        spec = TINY[self.variant]
        return {("tiny", spec.text.backbone): spec}

    def build(self, size: str, backbone: str, out: Path, dtype: torch.dtype, shard_bytes: int | None) -> None:
        spec = self.SPECS[size, backbone]
        tokenizer = build_tokenizer(spec)
        tokenizer.save_pretrained(out)
        config = {**hf_config(spec, tokenizer), "dtype": str(dtype).removeprefix("torch.")}
        write_json(out / "config.json", config)
        write_json(out / "generation_config.json", generation_config(tokenizer))
        image_processor(spec).save_pretrained(out)
        write_json(out / "processor_config.json", {"processor_class": PROCESSORS[spec.variant]})
        save_weights(hf_parameter_shapes(config), spec.text.initializer_range, out, dtype, shard_bytes)


QWEN2_VL, QWEN2_5_VL, QWEN3_VL = Builder("qwen2_vl"), Builder("qwen2_5_vl"), Builder("qwen3_vl")
