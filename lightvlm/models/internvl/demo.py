"""Random-weight InternVL checkpoints (the HF layout, InternVLForConditionalGeneration) for tests and the
demo server: `python -m lightvlm.models.demo --arch internvl --size tiny|small [--backbone qwen2|llama]`."""

from dataclasses import dataclass
from pathlib import Path

import torch

from lightvlm.models.demo_kit import (
    TextSpec,
    build_tokenizer,
    hf_parameter_shapes,
    save_weights,
    text_config,
    write_json,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                  "<video>"]
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}


@dataclass(frozen=True)
class DemoSpec:
    text: TextSpec
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    max_patches: int
    vision_qk_norm: bool = False
    vision_norm: str = "layer_norm"


SPECS: dict[tuple[str, str], DemoSpec] = {
    # Under 1M parameters, for tests: Qwen2 backbone, 4 heads over 2 KV heads, 16 tokens per tile.
    ("tiny", "qwen2"): DemoSpec(
        TextSpec(backbone="qwen2", vocab_target=700, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, initializer_range=0.1, tie_word_embeddings=True),
        vision_hidden=64, vision_layers=2, vision_heads=4, vision_intermediate=128, image_size=112, patch_size=14,
        max_patches=6,
    ),
    # The second tiny shape: Llama backbone, 6 heads over 2 KV heads (GQA 3), 3 layers, head_dim set
    # explicitly, BOS added by the tokenizer, an untied LM head, qk-norm + RMSNorm in the vision tower,
    # and 96-pixel tiles of 16-pixel patches (9 tokens per tile).
    ("tiny", "llama"): DemoSpec(
        TextSpec(backbone="llama", vocab_target=600, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2,
                 intermediate_size=96, head_dim=16, initializer_range=0.1, tie_word_embeddings=False,
                 rope_theta=10_000.0),
        vision_hidden=48, vision_layers=3, vision_heads=4, vision_intermediate=96, image_size=96, patch_size=16,
        max_patches=4, vision_qk_norm=True, vision_norm="rms_norm",
    ),
    # About 30M parameters, for the demo server and the benchmark: real InternVL tile geometry
    # (448-pixel tiles, patch 14, 256 tokens per tile, up to 12 tiles plus the thumbnail).
    ("small", "qwen2"): DemoSpec(
        TextSpec(backbone="qwen2", vocab_target=2000, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2,
                 intermediate_size=1536, initializer_range=0.05, tie_word_embeddings=True),
        vision_hidden=384, vision_layers=4, vision_heads=6, vision_intermediate=1536, image_size=448, patch_size=14,
        max_patches=12,
    ),
}


def vision_config(spec: DemoSpec) -> dict:
    return {
        "model_type": "internvl_vision",
        "hidden_size": spec.vision_hidden,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "intermediate_size": spec.vision_intermediate,
        "hidden_act": "gelu",
        "attention_bias": True,
        "use_qk_norm": spec.vision_qk_norm,
        "norm_type": spec.vision_norm,
        "layer_norm_eps": 1e-6,
        "image_size": [spec.image_size, spec.image_size],
        "patch_size": [spec.patch_size, spec.patch_size],
        "num_channels": 3,
        "use_absolute_position_embeddings": True,
        "layer_scale_init_value": 0.1,
        "use_mean_pooling": True,
        "initializer_range": spec.text.initializer_range,
    }


def tokens_per_tile(spec: DemoSpec, downsample_ratio: float = 0.5) -> int:
    return int((spec.image_size // spec.patch_size) ** 2 * downsample_ratio**2)


def build(size: str, backbone: str, out: Path, dtype: torch.dtype, shard_bytes: int | None) -> None:
    from transformers import GotOcr2ImageProcessorPil

    spec = SPECS[size, backbone]
    tokenizer = build_tokenizer(spec.text, SPECIAL_TOKENS, NAMED_TOKENS, CHATML_TEMPLATE)
    tokenizer.save_pretrained(out)
    image_seq_length = tokens_per_tile(spec)
    config = {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "text_config": text_config(spec.text, len(tokenizer), tokenizer),
        "vision_config": vision_config(spec),
        "image_token_id": tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        "image_seq_length": image_seq_length,
        "downsample_ratio": 0.5,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": spec.text.tie_word_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
    }
    write_json(out / "config.json", config)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    write_json(out / "generation_config.json", {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": sorted(set(eos)),
        "pad_token_id": tokenizer.pad_token_id,
    })
    GotOcr2ImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        crop_to_patches=False, min_patches=1, max_patches=spec.max_patches,
    ).save_pretrained(out)
    write_json(out / "processor_config.json", {
        "image_seq_length": image_seq_length, "processor_class": "InternVLProcessor",
    })
    save_weights(hf_parameter_shapes(config), spec.text.initializer_range, out, dtype, shard_bytes)
