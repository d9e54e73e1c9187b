"""Qwen-VL reference checkpoints written by transformers itself, and transformers as the reference.

`build_reference(variant, out)` instantiates Qwen2-VL / Qwen2.5-VL / Qwen3-VL from a config with
random weights (seeded, initializer_range 0.1; biases and norm weights drawn too, so that a mix-up
of any two tensors shows), and saves model and processor with `save_pretrained`. The shapes differ
from the demo checkpoints' and from each other (heads, GQA ratio, head_dim, layers, patch size,
windows, DeepStack layers, tied or untied head).

transformers' Qwen processors ask for a video processor, which needs torchvision; the subclasses
below take none, and `hf_processor` puts test/video_references.py's stand-in in its place. The video
processor settings each reference checkpoint gets (VIDEO_SETTINGS, in processor_config.json as
transformers 5 nests them) differ from its image settings, so that mixing them up shows.
"""

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from lightvlm.models.demo_kit import TextSpec
from lightvlm.models.qwen_vl.demo import (
    ARCHITECTURES,
    PROCESSORS,
    QwenSpec,
    build_tokenizer,
    hf_config,
    image_processor,
)

import hf_reference
from video_references import attach

VARIANTS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _text(backbone, **kwargs) -> TextSpec:
    base = dict(backbone=backbone, vocab_target=600, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=96, initializer_range=0.1, tie_word_embeddings=True, rope_theta=10_000.0,
                max_position_embeddings=4096)
    return TextSpec(**{**base, **kwargs})


REFERENCES: dict[str, QwenSpec] = {
    # 6 heads over 2 KV heads, head_dim 8, tied head; ViT of 3 blocks, width 24 over 2 heads
    "qwen2_vl": QwenSpec("qwen2_vl", _text("qwen2", num_heads=6, hidden_size=48, num_layers=3), (2, 1, 1),
                         vision_hidden=24, vision_depth=3, vision_heads=2, vision_intermediate=48, patch_size=14,
                         min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48),
    # untied head, 4 heads over 1 KV head (GQA 4), head_dim 16; 2-unit windows, block 1 of 3 full attention
    "qwen2_5_vl": QwenSpec("qwen2_5_vl", _text("qwen2", hidden_size=64, num_kv_heads=1, tie_word_embeddings=False),
                           (4, 2, 2), vision_hidden=32, vision_depth=3, vision_heads=4, vision_intermediate=40,
                           patch_size=14, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48, window_size=56,
                           fullatt_block_indexes=(1,)),
    # qk-norm, head_dim 24 stated (not hidden / heads), 3 layers of which DeepStack feeds 2; patch 16,
    # a 5 x 5 table of learned positions interpolated to every grid
    "qwen3_vl": QwenSpec("qwen3_vl", _text("qwen3", hidden_size=48, num_layers=3, head_dim=24), (4, 4, 4),
                         vision_hidden=32, vision_depth=3, vision_heads=2, vision_intermediate=64, patch_size=16,
                         min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 40, num_position_embeddings=25,
                         deepstack_visual_indexes=(0, 2)),
}


CLIP_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
# Each model's video processor config: other bounds and normalization than its images, Qwen3-VL sampling
# 2 fps by default (at least 4 frames), Qwen2.5-VL's frames capped the qwen-vl-utils way.
VIDEO_SETTINGS = {
    "qwen2_vl": {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 28 * 28 * 2,
                 "longest_edge": 28 * 28 * 12}, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_sample_frames": False,
                 "min_frames": 2, "max_frames": 16, "resample": 3},
    "qwen2_5_vl": {"video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": 28 * 28 * 4,
                   "max_pixels": 28 * 28 * 20, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                   **CLIP_NORM, "do_sample_frames": False, "min_frames": 4, "max_frames": 16,
                   "cap_pixels_per_frame": True, "max_video_tokens": 40, "resample": 3},
    "qwen3_vl": {"video_processor_type": "Qwen3VLVideoProcessor", "size": {"shortest_edge": 32 * 32 * 4,
                 "longest_edge": 32 * 32 * 48}, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                 **CLIP_NORM, "do_sample_frames": True, "fps": 2, "min_frames": 4, "max_frames": 12,
                 "resample": 3},
}
VIDEO_STYLES = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3"}
TOKENS_PER_SECOND = 7  # Qwen2.5-VL's temporal positions per second (the Hub's models have 2): odd, so that the
# float32 truncation of its positions shows


def processor_class(variant: str):
    """transformers' processor for the variant, without the video processor (no torchvision here)."""
    base = getattr(transformers, PROCESSORS[variant])

    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = PROCESSORS[variant]
    return ImageOnly


def randomize(model: torch.nn.Module, std: float, seed: int) -> None:
    """Draw what transformers' init leaves constant (biases 0, norm weights 1), and sharpen attention:
    with q and k at one `std`, tiny models repeat one token whatever the context."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("q_norm.weight", "k_norm.weight")):  # qk-norm would undo a larger q, k
                param.copy_(2.5 * (1 + 0.1 * noise))
            elif "norm" in name or "ln_q" in name:
                param.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif name.endswith("bias"):
                param.copy_(std * noise)
            elif any(key in name for key in ("q_proj", "k_proj", "attn.qkv")):
                param.mul_(3)


def build_reference(variant: str, out: Path, seed: int = 0, spec: QwenSpec | None = None) -> Path:
    spec = spec or REFERENCES[variant]
    tokenizer = build_tokenizer(spec)
    hf = hf_config(spec, tokenizer)
    if variant == "qwen2_5_vl":
        hf["vision_config"]["tokens_per_second"] = TOKENS_PER_SECOND
    config = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[variant])(config)
    randomize(model, spec.text.initializer_range, seed)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor = processor_class(variant)(image_processor(spec), tokenizer, chat_template=tokenizer.chat_template)
    processor.save_pretrained(out)
    # transformers cannot build the video processor without torchvision: its config is added as it nests it
    path = out / "processor_config.json"
    saved = json.loads(path.read_text())
    saved["video_processor"] = VIDEO_SETTINGS[variant]
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out


def reference_checkpoint(root: Path, variant: str) -> Path:
    """The variant's reference checkpoint under `root`, built the first time it is asked for."""
    out = root / f"reference-{variant}"
    return out if (out / "model.safetensors").exists() else build_reference(variant, out)


def variant_of(model_dir: Path) -> str:
    return json.loads((Path(model_dir) / "config.json").read_text())["model_type"]


@lru_cache(maxsize=8)
def hf_processor(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    variant = variant_of(model_dir)
    processor = processor_class(variant)(Qwen2VLImageProcessorPil.from_pretrained(model_dir), tokenizer,
                                         chat_template=tokenizer.chat_template)
    settings = json.loads((Path(model_dir) / "processor_config.json").read_text()).get("video_processor", {})
    return attach(processor, VIDEO_STYLES[variant], settings)


@lru_cache(maxsize=8)
def hf_model(model_dir: Path):
    model_class = getattr(transformers, ARCHITECTURES[variant_of(model_dir)])
    return model_class.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_inputs(model_dir: Path, messages: list[dict], min_pixels: int | None = None,
              max_pixels: int | None = None, **kwargs) -> dict:
    """transformers' inputs for a conversation; `kwargs` go to the processor (fps, num_frames, video_metadata)."""
    processor = hf_processor(model_dir)
    if min_pixels or max_pixels:
        size = dict(processor.image_processor.size)
        size.update({k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v})
        kwargs["size"] = size
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs=kwargs)


@torch.no_grad()
def hf_generate(model_dir: Path, messages: list[dict], max_new_tokens: int, **kwargs) -> tuple[list[int], dict]:
    inputs = hf_inputs(model_dir, messages, **kwargs)
    out = hf_model(model_dir).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs


@torch.no_grad()
def hf_next_logits(model_dir: Path, inputs: dict, generated: list[int]) -> torch.Tensor:
    """transformers' logits after the prompt and `generated`, in one forward (no cache)."""
    extra = torch.tensor([generated], dtype=torch.long)
    names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    kwargs = {k: inputs[k] for k in names if k in inputs}
    if "mm_token_type_ids" in inputs:
        kwargs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    ids = torch.cat([inputs["input_ids"], extra], dim=1)
    return hf_model(model_dir)(input_ids=ids, **kwargs).logits[0, -1]


def messages(text: str, images: list) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def assert_same_greedy(model_dir: Path, ours: list[int], reference: list[int], inputs: dict, label: str) -> None:
    hf_reference.assert_same_greedy(model_dir, ours, reference, inputs, label, next_logits=hf_next_logits)


def with_text(spec: QwenSpec, **changes) -> QwenSpec:
    return replace(spec, text=replace(spec.text, **changes))
