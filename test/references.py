"""Reference checkpoints as users have them, written by transformers itself.

Each model is built by transformers from its config (`from_config` under a fixed seed, initializer_range
0.1) and saved with `save_pretrained`, together with its processor or tokenizer, so the folder is what a
user's folder is:

- `internvl_hf`: InternVLForConditionalGeneration in transformers 5's layout (`processor_config.json`
  with the image processor nested in it, `chat_template.jinja`);
- the same weights as transformers 4.x wrote them and as OpenGVLab's original InternVLChatModel folder
  (InternLM2, Qwen2 and Llama decoders): `layouts.py`;
- `text_only`: Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM.

transformers initialises norms to one and biases, position embeddings and the CLS token to zero; every
tensor it sets to a constant gets seeded noise (std 0.1) on top, so that a tensor loaded into the wrong
place, or not at all, changes the tokens (`liven`). The tokenizer is the demo's byte-level BPE
(`demo_kit.build_tokenizer`), saved by transformers with the model.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightvlm.models.demo_kit import TextSpec, build_tokenizer
from lightvlm.models.internvl.demo import CHATML_TEMPLATE, NAMED_TOKENS, SPECIAL_TOKENS

from layouts import TEXT_CHATML, edit_json, legacy_layout, original_layout

SEED = 0
INIT_STD = 0.1



@dataclass(frozen=True)
class TextShape:
    backbone: str  # "qwen2" | "llama" | "qwen3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    rope: dict = field(default_factory=dict)  # rope_parameters besides rope_theta
    attention_bias: bool = False  # llama only
    vocab_target: int = 600


@dataclass(frozen=True)
class VisionShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    max_patches: int
    use_qk_norm: bool = False
    norm_type: str = "layer_norm"
    attention_bias: bool = True
    feature_layer: int = -1


@dataclass(frozen=True)
class VLMShape:
    text: TextShape
    vision: VisionShape

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision.image_size // self.vision.patch_size // 2) ** 2


VLM_SHAPES = {
    # Qwen2: tied head, q/k/v biases, dynamic rope (as Qwen2.5 in InternVL2.5/3 carries), 16 tokens per tile
    "qwen2": VLMShape(TextShape("qwen2", 64, 2, 4, 2, 128, True, rope={"rope_type": "dynamic", "factor": 2.0}),
                      VisionShape(64, 2, 4, 128, 112, 14, max_patches=6)),
    # Llama: GQA 3, explicit head_dim, untied head, BOS; qk-norm + RMSNorm vision tower read at its
    # second-to-last layer; 96-pixel tiles of 16-pixel patches (9 tokens per tile)
    "llama": VLMShape(TextShape("llama", 48, 3, 6, 2, 96, False, head_dim=16),
                      VisionShape(48, 3, 4, 96, 96, 16, max_patches=4, use_qk_norm=True, norm_type="rms_norm",
                                  feature_layer=-2)),
    # the source of the InternLM2 folder: GQA 4, attention biases (InternLM2's `bias`), linear rope;
    # a LayerNorm vision tower with qk-norm and no qkv bias (InternViT-6B's combination)
    "internlm2": VLMShape(TextShape("llama", 64, 2, 8, 2, 96, False, attention_bias=True,
                                    rope={"rope_type": "linear", "factor": 2.0}),
                          VisionShape(32, 2, 2, 64, 56, 14, max_patches=6, use_qk_norm=True, attention_bias=False)),
}

TEXT_SHAPES = {
    "qwen2": TextShape("qwen2", 64, 2, 4, 2, 128, True),
    "llama": TextShape("llama", 48, 2, 6, 3, 96, False, head_dim=16,
                       rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 512}),
    "qwen3": TextShape("qwen3", 64, 2, 4, 2, 128, False, head_dim=32),  # head_dim != hidden / heads
}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# -- building ------------------------------------------------------------------------------------

def tokenizer_for(shape: TextShape, family_tokens=(), named_tokens=None, template=TEXT_CHATML):
    """The demo's BPE as a transformers tokenizer: Qwen2's specials for qwen2/qwen3, `<s>`/`</s>` and
    an added BOS for llama."""
    spec = TextSpec(backbone="qwen2" if shape.backbone == "qwen3" else shape.backbone,
                    vocab_target=shape.vocab_target, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                    num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                    intermediate_size=shape.intermediate_size, initializer_range=INIT_STD,
                    tie_word_embeddings=shape.tie_word_embeddings, max_position_embeddings=4096)
    return build_tokenizer(spec, list(family_tokens), named_tokens or {}, template)


def text_config(shape: TextShape, tokenizer) -> dict:
    config = dict(
        model_type=shape.backbone, vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=INIT_STD,
        tie_word_embeddings=shape.tie_word_embeddings, rope_parameters={"rope_theta": 10000.0, **shape.rope},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id)
    if "rope_type" not in shape.rope:
        config["rope_parameters"]["rope_type"] = "default"
    if shape.head_dim is not None:
        config["head_dim"] = shape.head_dim
    if shape.backbone == "llama":
        config["attention_bias"] = shape.attention_bias
    return config


@torch.no_grad()
def liven(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded noise (std 0.1) on every tensor transformers initialised to a constant, and query/key
    projections three times sharper: at one std everywhere, tiny models' greedy decoding settles on
    one token within a few steps, and a test on such output proves little."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() > 0 and bool((tensor == tensor.flatten()[0]).all()):
            tensor.add_(INIT_STD * torch.randn(tensor.shape, generator=generator))
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor.mul_(3)


def save_model(model, out: Path, tokenizer) -> None:
    model.generation_config.eos_token_id = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                                   tokenizer.eos_token_id})
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)


def internvl_hf(out: Path, shape: VLMShape) -> Path:
    from transformers import AutoConfig, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

    from hf_reference import ImageOnlyInternVLProcessor

    tokenizer = tokenizer_for(shape.text, SPECIAL_TOKENS, NAMED_TOKENS, CHATML_TEMPLATE)
    v = shape.vision
    config = AutoConfig.for_model(
        "internvl", text_config=text_config(shape.text, tokenizer),
        vision_config=dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                           image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2, use_qk_norm=v.use_qk_norm,
                           norm_type=v.norm_type, attention_bias=v.attention_bias, initializer_range=INIT_STD),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=shape.tokens_per_tile,
        vision_feature_layer=v.feature_layer, tie_word_embeddings=shape.text.tie_word_embeddings)
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = InternVLForConditionalGeneration(config)
    liven(model, generator)
    save_model(model, out, tokenizer)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": v.image_size, "width": v.image_size}, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], crop_to_patches=True, min_patches=1, max_patches=v.max_patches)
    ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=shape.tokens_per_tile,
                               chat_template=CHATML_TEMPLATE).save_pretrained(out)
    # the subclass only drops the video processor; a user's folder names transformers' class
    for name in ("processor_config.json", "tokenizer_config.json"):
        edit_json(out / name, lambda c: c.update(processor_class="InternVLProcessor"))
    return out


def text_only(out: Path, shape: TextShape) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer_for(shape)
    config = AutoConfig.for_model(**text_config(shape, tokenizer), architectures=[ARCHITECTURES[shape.backbone]])
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    liven(model, generator)
    save_model(model, out, tokenizer)
    tokenizer.save_pretrained(out)
    return out


# -- the library and the cases -------------------------------------------------------------------

class ReferenceLibrary:
    """Builds each named checkpoint on first use (once per session) under `root`:
    hf-<vlm>, legacy-<vlm>, original-<vlm> for <vlm> in VLM_SHAPES; text-<llm> for <llm> in TEXT_SHAPES."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.built:
            layout, kind = name.split("-", 1)
            out = self.root / name
            if layout == "hf":
                self.built[name] = internvl_hf(out, VLM_SHAPES[kind])
            elif layout == "legacy":
                self.built[name] = legacy_layout(self(f"hf-{kind}"), out)
            elif layout == "original":
                self.built[name] = original_layout(self(f"hf-{kind}"), out, internlm2=kind == "internlm2")
            else:
                self.built[name] = text_only(out, TEXT_SHAPES[kind])
        return self.built[name]

    def reference(self, name: str) -> Path:
        """The folder transformers runs as the reference for `name`: the HF folder its weights came from."""
        layout, kind = name.split("-", 1)
        return self(f"hf-{kind}" if layout in ("legacy", "original") else name)


def vlm_cases() -> dict[str, list[dict]]:
    """Conversations in transformers' form (images as PIL parts), also what the pipeline takes."""
    from helpers import load_image

    coffee, strip, camera = (load_image(n) for n in ("coffee.jpg", "coffee_strip_600x40.jpg", "camera_gray.png"))
    return {
        "text": [{"role": "user", "content": [{"type": "text", "text": "Describe the cat in detail, please."}]}],
        "one image": [{"role": "user", "content": [{"type": "image", "image": coffee},
                                                   {"type": "text", "text": "Describe this image."}]}],
        "two images": [{"role": "user", "content": [{"type": "image", "image": strip},
                                                    {"type": "image", "image": camera},
                                                    {"type": "text", "text": "What differs between these two?"}]}],
        "multi-turn": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image", "image": coffee},
                                         {"type": "text", "text": "What is this? Answer in one word."}]},
            {"role": "assistant", "content": "A cup."},
            {"role": "user", "content": [{"type": "text", "text": "And here, which colors do you see?"},
                                         {"type": "image", "image": camera}]}],
    }


TEXT_CASES = {
    "text": [{"role": "user", "content": "Tell me a story about a cat and a cup of coffee."}],
    "multi-turn": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Name a color."},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "And another one, with a reason?"}],
}


_GREEDY: dict[tuple, tuple[list[int], dict]] = {}


def reference_greedy(ref_dir: Path, case: str, messages: list[dict], max_new_tokens: int) -> tuple[list[int], dict]:
    """transformers' greedy ids for a case (and its inputs), computed once per session."""
    from hf_reference import hf_generate

    key = (ref_dir, case, max_new_tokens)
    if key not in _GREEDY:
        _GREEDY[key] = hf_generate(ref_dir, messages, max_new_tokens)
    return _GREEDY[key]
