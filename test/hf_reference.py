"""transformers as the reference: its processor and generate() on the same checkpoint (InternVL, or
the causal LM and tokenizer of a text-only folder).

InternVLProcessor asks for a video processor, which needs torchvision; the subclass below takes
none, which is all the image path needs.
"""

import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration
from transformers import InternVLProcessor as HFInternVLProcessor


class ImageOnlyInternVLProcessor(HFInternVLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)


def is_text_only(model_dir: Path) -> bool:
    return "vision_config" not in json.loads((model_dir / "config.json").read_text())


@lru_cache(maxsize=16)
def hf_processor(model_dir: Path) -> ImageOnlyInternVLProcessor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seq = json.loads((model_dir / "processor_config.json").read_text())["image_seq_length"]
    return ImageOnlyInternVLProcessor(GotOcr2ImageProcessorPil.from_pretrained(model_dir), tokenizer,
                                      image_seq_length=seq, chat_template=tokenizer.chat_template)


@lru_cache(maxsize=16)
def hf_model(model_dir: Path) -> InternVLForConditionalGeneration:
    """InternVL, or the causal LM of a text-only folder."""
    auto = AutoModelForCausalLM if is_text_only(model_dir) else InternVLForConditionalGeneration
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_messages(text: str, images: list) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def hf_inputs(model_dir: Path, messages: list[dict]) -> dict:
    if is_text_only(model_dir):
        return AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    return hf_processor(model_dir).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt")


@torch.no_grad()
def hf_generate(model_dir: Path, messages: list[dict], max_new_tokens: int) -> tuple[list[int], dict]:
    inputs = hf_inputs(model_dir, messages)
    out = hf_model(model_dir).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs


@torch.no_grad()
def hf_next_logits(model_dir: Path, inputs: dict, generated: list[int]) -> torch.Tensor:
    ids = torch.cat([inputs["input_ids"], torch.tensor([generated], dtype=torch.long)], dim=1)
    kwargs = {"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else {}
    return hf_model(model_dir)(input_ids=ids, **kwargs).logits[0, -1]


TIES: list[str] = []


def assert_same_greedy(model_dir: Path, ours: list[int], reference: list[int], inputs: dict, label: str,
                       next_logits=None) -> None:
    """Ids must match exactly; the only excuse is a numerical tie in transformers' own logits at the
    first differing step (top two within 1e-4), which is reported. `next_logits(model_dir, inputs,
    generated)` is transformers' logits after the prompt and `generated` (InternVL's by default)."""
    if ours == reference:
        return
    step = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    logits = (next_logits or hf_next_logits)(model_dir, inputs, reference[:step])
    top2 = logits.topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap <= 1e-4, (f"{label}: ids differ at step {step} (ours {ours[step:step + 3]}, transformers "
                         f"{reference[step:step + 3]}) and transformers' top-2 logit gap is {gap:.3g}: not a tie")
    note = f"{label}: numerical tie at step {step}, top-2 logit gap {gap:.2e}"
    TIES.append(note)
    warnings.warn(note, stacklevel=2)
