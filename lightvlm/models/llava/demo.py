"""Random-weight LLaVA checkpoints (the HF layout, LlavaForConditionalGeneration) for tests and the demo
server: `python -m lightvlm.models.demo --arch llava --size tiny [--backbone llama|qwen2]`
(LLaVA-NeXT: `--arch llava_next`, demo_next.py).

The processor files are written by transformers' own LlavaProcessor / LlavaNextProcessor; the
weights by the shared demo kit, or by any `save_model` the caller passes (the parity tests let
transformers' save_pretrained write them).
"""

from collections.abc import Callable
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

# LLaVA-1.5's template (USER: / ASSISTANT:, images before the text, the assistant's text inside
# transformers' {% generation %} block), also taking string contents.
VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-interleave-qwen's ChatML, images where they appear
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

TEMPLATES = {"llama": VICUNA_TEMPLATE, "qwen2": CHATML_TEMPLATE}


@dataclass(frozen=True)
class DemoSpec:
    text: TextSpec
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 64
    image_size: int = 32
    patch_size: int = 8
    feature_layer: int | tuple[int, ...] = -2
    select_strategy: str = "default"
    do_pad: bool = False  # LLaVA: pad to a square before resizing (llava-hf's newer processors)
    do_center_crop: bool = True
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT only

    @property
    def tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (self.select_strategy == "full")


# Llama: 6 heads over 2 KV heads, head_dim 16, untied head, BOS. Qwen2: 4 over 2, tied head.
TINY_TEXT = {
    "llama": TextSpec(backbone="llama", vocab_target=600, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2,
                      intermediate_size=96, head_dim=16, initializer_range=0.1, tie_word_embeddings=False,
                      rope_theta=10_000.0),
    "qwen2": TextSpec(backbone="qwen2", vocab_target=700, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, initializer_range=0.1, tie_word_embeddings=True),
}

# Under 1M parameters: a 3-layer CLIP of width 32 over 32-pixel crops of 8-pixel patches (16 rows a crop).
SPECS: dict[tuple[str, str], DemoSpec] = {
    ("tiny", "llama"): DemoSpec(TINY_TEXT["llama"], do_pad=True),
    ("tiny", "qwen2"): DemoSpec(TINY_TEXT["qwen2"], feature_layer=(-3, -1), select_strategy="full"),
}


def vision_config(spec: DemoSpec) -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": spec.vision_hidden,
        "initializer_range": spec.text.initializer_range,
    }


def model_config(spec: DemoSpec, tokenizer, architecture: str, dtype: torch.dtype) -> dict:
    is_next = architecture == "LlavaNextForConditionalGeneration"
    layer = list(spec.feature_layer) if isinstance(spec.feature_layer, tuple) else spec.feature_layer
    config = {
        "model_type": "llava_next" if is_next else "llava",
        "architectures": [architecture],
        "text_config": text_config(spec.text, len(tokenizer), tokenizer),
        "vision_config": vision_config(spec),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "image_seq_length": spec.tokens_per_crop,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": spec.select_strategy,
        "tie_word_embeddings": spec.text.tie_word_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if is_next:
        config["image_grid_pinpoints"] = [list(p) for p in spec.grid_pinpoints]
    return config


def save_processor(spec: DemoSpec, tokenizer, out: Path, is_next: bool) -> None:
    """transformers' own processor writes processor_config.json (image processor settings inside)."""
    from transformers import LlavaImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor
    from transformers import LlavaProcessor as HFLlavaProcessor

    sizes = {"size": {"shortest_edge": spec.image_size},
             "crop_size": {"height": spec.image_size, "width": spec.image_size},
             "do_center_crop": spec.do_center_crop}
    if is_next:
        pinpoints = [list(p) for p in spec.grid_pinpoints]
        image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints)
        processor_class = LlavaNextProcessor
    else:
        image_processor = LlavaImageProcessorPil(**sizes, do_pad=spec.do_pad)
        processor_class = HFLlavaProcessor
    processor_class(image_processor, tokenizer, patch_size=spec.patch_size,
                    vision_feature_select_strategy=spec.select_strategy, chat_template=tokenizer.chat_template,
                    num_additional_image_tokens=1).save_pretrained(out)


SaveModel = Callable[[dict, Path], None]  # (config.json dict, folder) -> writes config.json and the weights


def demo_weights(dtype: torch.dtype, shard_bytes: int | None, std: float) -> SaveModel:
    def save(config: dict, out: Path) -> None:
        write_json(out / "config.json", config)
        save_weights(hf_parameter_shapes(config), std, out, dtype, shard_bytes)
    return save


def write_checkpoint(spec: DemoSpec, architecture: str, out: Path, dtype: torch.dtype, save_model: SaveModel) -> None:
    tokenizer = build_tokenizer(spec.text, ["<image>"], {"image_token": "<image>"}, TEMPLATES[spec.text.backbone])
    tokenizer.save_pretrained(out)
    save_processor(spec, tokenizer, out, is_next=architecture == "LlavaNextForConditionalGeneration")
    save_model(model_config(spec, tokenizer, architecture, dtype), out)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    write_json(out / "generation_config.json", {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": sorted(set(eos)),
        "pad_token_id": tokenizer.pad_token_id,
    })


def build(size: str, backbone: str, out: Path, dtype: torch.dtype, shard_bytes: int | None) -> None:
    spec = SPECS[size, backbone]
    write_checkpoint(spec, "LlavaForConditionalGeneration", out, dtype,
                     demo_weights(dtype, shard_bytes, spec.text.initializer_range))
