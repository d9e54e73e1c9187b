"""LLaVA / LLaVA-NeXT reference checkpoints written by transformers itself, and transformers as the reference.

Each checkpoint is a demo spec (models/llava/demo.py, demo_next.py) whose processor files transformers'
LlavaProcessor / LlavaNextProcessor save, and whose model transformers builds from the config and
writes with `save_pretrained`, after every tensor is drawn from a generator seeded by its name
(initializer_range 0.1, norms near 1, biases non-zero: a wrong op anywhere changes the tokens).
"""

import shutil
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from lightvlm.models.demo_kit import random_tensor
from lightvlm.models.llava import demo, demo_next

import hf_reference

# name -> (architecture, spec)
REFERENCES = {
    "llava_llama": ("LlavaForConditionalGeneration", demo.SPECS["tiny", "llama"]),  # -2, default, pad to square
    "llava_qwen2": ("LlavaForConditionalGeneration", demo.SPECS["tiny", "qwen2"]),  # [-3, -1], full, center crop
    "next_llama": ("LlavaNextForConditionalGeneration", demo_next.SPECS["tiny", "llama"]),  # -2
    "next_qwen2": ("LlavaNextForConditionalGeneration", demo_next.SPECS["tiny", "qwen2"]),  # [-2, -1]
}


def transformers_save(std: float):
    def save(config: dict, out: Path) -> None:
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config))
        tied = config["tie_word_embeddings"]
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if not (tied and name == "lm_head.weight"):  # shares the embedding's storage
                    tensor.copy_(random_tensor(name, tuple(tensor.shape), std))
        model.save_pretrained(out)
    return save


def build_reference(name: str, out: Path) -> Path:
    architecture, spec = REFERENCES[name]
    out.mkdir(parents=True, exist_ok=True)
    demo.write_checkpoint(spec, architecture, out, torch.float32, transformers_save(spec.text.initializer_range))
    return out


class ReferenceCheckpoints:
    """Builds each reference on first use, once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self.built:
            self.built[name] = build_reference(name, self.root / name)
        return self.built[name]


# transformers < 4.52 wrote these names (LLaVA-1.5 / 1.6 checkpoints on the Hub still have them)
OLD_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline"))


def old_layout_copy(model_dir: Path, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    renamed = {}
    for name, tensor in tensors.items():
        old, new = next((p for p in OLD_PREFIXES if name.startswith(p[0])), ("", ""))
        renamed[new + name.removeprefix(old)] = tensor
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


# -- transformers as the reference ------------------------------------------------------------------

@lru_cache(maxsize=8)
def hf_processor(model_dir: Path):
    return AutoProcessor.from_pretrained(model_dir)


@lru_cache(maxsize=8)
def hf_model(model_dir: Path):
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_inputs(model_dir: Path, messages: list[dict]) -> dict:
    return hf_processor(model_dir).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt")


def image_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}


@torch.no_grad()
def hf_generate(model_dir: Path, messages: list[dict], max_new_tokens: int) -> tuple[list[int], dict]:
    inputs = hf_inputs(model_dir, messages)
    out = hf_model(model_dir).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs


@torch.no_grad()
def hf_next_logits(model_dir: Path, inputs: dict, generated: list[int]) -> torch.Tensor:
    ids = torch.cat([inputs["input_ids"], torch.tensor([generated], dtype=torch.long)], dim=1)
    return hf_model(model_dir)(input_ids=ids, **image_inputs(inputs)).logits[0, -1]


def assert_same_greedy(model_dir: Path, ours: list[int], reference: list[int], inputs: dict, label: str) -> None:
    hf_reference.assert_same_greedy(model_dir, ours, reference, inputs, label, next_logits=hf_next_logits)
