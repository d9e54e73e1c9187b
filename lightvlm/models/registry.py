"""Model families, found by the checkpoint's `architectures[0]`: one line per architecture.

A family is named by strings ("module:object") so that reading the registry imports nothing heavy:
the httpserver needs only the config and the processor, the model workers the language half, the
encoder workers the visual half. Adding a family is a folder under models/ and lines here (see
docs/models.md).
"""

import importlib
from dataclasses import dataclass
from functools import cache


@cache
def load_object(path: str):
    """Import "package.module:name" (name may be dotted: "Class.method") and return the object."""
    module, name = path.split(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config: str  # a callable: HF config.json dict -> the family's frozen config (with `.text`)
    processor_class: str  # (model_dir, config) -> processor; no torch in its module
    language_class: str  # (config, tp) -> CausalLM
    visual_class: str | None  # (config, tp) -> the vision tower + projector; None for text-only LLMs
    weights: str  # checkpoint tensor name -> ("visual" | "language", our name) or None

    def parse_config(self, hf: dict):
        return load_object(self.config)(hf)

    def rename(self, name: str) -> "tuple[str, str] | None":
        return load_object(self.weights)(name)


INTERNVL = ModelFamily(
    name="internvl",
    config="lightvlm.models.internvl.config:InternVLConfig.from_hf",
    processor_class="lightvlm.models.internvl.processor:InternVLProcessor",
    language_class="lightvlm.models.internvl.model:InternVLLanguage",
    visual_class="lightvlm.models.internvl.model:InternVLVisual",
    weights="lightvlm.models.internvl.weights:rename",
)

# OpenGVLab's own layout (what `--trust_remote_code` loads): the same model under other names and keys
INTERNVL_ORIGINAL = ModelFamily(
    name="internvl_chat",
    config="lightvlm.models.internvl.config:InternVLConfig.from_original",
    processor_class="lightvlm.models.internvl.processor:InternVLProcessor",
    language_class="lightvlm.models.internvl.model:InternVLLanguage",
    visual_class="lightvlm.models.internvl.model:InternVLVisual",
    weights="lightvlm.models.internvl.weights:rename_original",
)

LLM = ModelFamily(
    name="llm",
    config="lightvlm.models.llm.config:LLMConfig.from_hf",
    processor_class="lightvlm.models.processor:TextProcessor",
    language_class="lightvlm.models.llm.model:LLMLanguage",
    visual_class=None,
    weights="lightvlm.models.llm.weights:rename",
)

LLAVA = ModelFamily(
    name="llava",
    config="lightvlm.models.llava.config:LlavaConfig.from_hf",
    processor_class="lightvlm.models.llava.processor:LlavaProcessor",
    language_class="lightvlm.models.llava.model:LlavaLanguage",
    visual_class="lightvlm.models.llava.model:LlavaVisual",
    weights="lightvlm.models.llava.weights:rename",
)

LLAVA_NEXT = ModelFamily(
    name="llava_next",
    config="lightvlm.models.llava.config:LlavaNextConfig.from_hf",
    processor_class="lightvlm.models.llava.processor:LlavaNextProcessor",
    language_class="lightvlm.models.llava.model:LlavaLanguage",
    visual_class="lightvlm.models.llava.model:LlavaNextVisual",
    weights="lightvlm.models.llava.weights:rename",
)


def qwen_vl(variant: str) -> ModelFamily:
    """The Qwen-VL line: one folder, one config reader per model."""
    return ModelFamily(
        name=variant,
        config=f"lightvlm.models.qwen_vl.config:QwenVLConfig.{variant}",
        processor_class="lightvlm.models.qwen_vl.processor:QwenVLProcessor",
        language_class="lightvlm.models.qwen_vl.model:QwenVLLanguage",
        visual_class="lightvlm.models.qwen_vl.model:QwenVLVisual",
        weights="lightvlm.models.qwen_vl.weights:rename",
    )


# architectures[0] -> family
ARCHITECTURES: dict[str, ModelFamily] = {
    "InternVLForConditionalGeneration": INTERNVL,
    "LlavaForConditionalGeneration": LLAVA,
    "LlavaNextForConditionalGeneration": LLAVA_NEXT,
    "Qwen2VLForConditionalGeneration": qwen_vl("qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": qwen_vl("qwen2_5_vl"),
    "Qwen3VLForConditionalGeneration": qwen_vl("qwen3_vl"),
    "InternVLChatModel": INTERNVL_ORIGINAL,
    "Qwen2ForCausalLM": LLM,
    "LlamaForCausalLM": LLM,
    "Qwen3ForCausalLM": LLM,
}

# architectures known and refused, with why (instead of the generic "unsupported")
REFUSED: dict[str, str] = {
    "Qwen3VLMoeForConditionalGeneration": "the Qwen3-VL mixture-of-experts models are not supported yet; the dense "
                                          "Qwen3-VL models (Qwen3VLForConditionalGeneration) are",
}


def get_family(hf_config: dict) -> ModelFamily:
    architectures = hf_config.get("architectures") or []
    name = architectures[0] if architectures else None
    if name in REFUSED:
        raise ValueError(f"unsupported architecture {name!r}: {REFUSED[name]}")
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]
