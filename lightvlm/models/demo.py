"""Build random-weight demo checkpoints offline, in the Hugging Face layout real checkpoints use.

    python -m lightvlm.models.demo --arch internvl --size tiny --out DIR

The folder holds exactly what a real HF-format checkpoint holds (config.json, model.safetensors or
shards with an index, tokenizer files with a chat template, image-processor and processor configs,
generation_config.json), so that both lightvlm and transformers load it unchanged. Everything is
deterministic: the same command writes the same bytes.

The weights are random. Norm weights and layer scales sit near 1, and everything else is drawn with
the config's `initializer_range` (about 0.1 for tiny models; query and key projections three times
that), so that greedy decoding wanders through the vocabulary instead of repeating one token, and a
wrong op anywhere changes the tokens.
"""

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")

# Qwen2's pre-tokenizer pattern (contractions, letters, single digits, punctuation runs, newlines).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
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

INTERNVL_SPECIAL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                           "<box>", "</box>", "<video>"]


@dataclass(frozen=True)
class DemoSpec:
    """The shapes of one demo checkpoint. `backbone` picks the language model family."""

    backbone: str  # "qwen2" | "llama"
    vocab_target: int  # BPE vocabulary size asked of the trainer (before special tokens)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    max_patches: int
    initializer_range: float
    tie_word_embeddings: bool
    head_dim: int | None = None
    vision_qk_norm: bool = False
    vision_norm: str = "layer_norm"
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 8192
    extra: dict = field(default_factory=dict)


SPECS: dict[tuple[str, str, str], DemoSpec] = {
    # Under 1M parameters, for tests: Qwen2 backbone, 4 heads over 2 KV heads, 16 tokens per tile.
    ("internvl", "tiny", "qwen2"): DemoSpec(
        backbone="qwen2", vocab_target=700, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, vision_hidden=64, vision_layers=2, vision_heads=4, vision_intermediate=128,
        image_size=112, patch_size=14, max_patches=6, initializer_range=0.1, tie_word_embeddings=True,
    ),
    # The second tiny shape: Llama backbone, 6 heads over 2 KV heads (GQA 3), 3 layers, head_dim set
    # explicitly, BOS added by the tokenizer, an untied LM head, qk-norm + RMSNorm in the vision tower,
    # and 96-pixel tiles of 16-pixel patches (9 tokens per tile).
    ("internvl", "tiny", "llama"): DemoSpec(
        backbone="llama", vocab_target=600, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2,
        intermediate_size=96, head_dim=16, vision_hidden=48, vision_layers=3, vision_heads=4,
        vision_intermediate=96, image_size=96, patch_size=16, max_patches=4, initializer_range=0.1,
        tie_word_embeddings=False, vision_qk_norm=True, vision_norm="rms_norm", rope_theta=10_000.0,
    ),
    # About 30M parameters, for the demo server and the benchmark: real InternVL tile geometry
    # (448-pixel tiles, patch 14, 256 tokens per tile, up to 12 tiles plus the thumbnail).
    ("internvl", "small", "qwen2"): DemoSpec(
        backbone="qwen2", vocab_target=2000, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=2,
        intermediate_size=1536, vision_hidden=384, vision_layers=4, vision_heads=6, vision_intermediate=1536,
        image_size=448, patch_size=14, max_patches=12, initializer_range=0.05, tie_word_embeddings=True,
    ),
}


# --------------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE trained on the bundled corpus, wrapped the way real checkpoints ship it.
# --------------------------------------------------------------------------------------------------

def train_bpe(vocab_target: int):
    """Train a deterministic byte-level BPE (Qwen2's normalizer, split pattern and decoder)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator(lines, trainer=trainer)
    vocab = tokenizer.get_vocab()
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return vocab, [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build_tokenizer(spec: DemoSpec):
    """Returns a transformers tokenizer carrying the InternVL image tokens and the ChatML template."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    vocab, merges = train_bpe(spec.vocab_target)
    image_tokens = {
        "start_image_token": "<img>", "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
    }
    if spec.backbone == "qwen2":
        tokenizer = Qwen2Tokenizer(
            vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens=image_tokens, model_max_length=spec.max_position_embeddings,
        )
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_SPECIAL_TOKENS]
    else:
        # A Llama-style tokenizer: `<s>` is prepended by the post-processor, as in InternLM2-based
        # InternVL checkpoints, so the processor's add_special_tokens handling is exercised.
        qwen_like = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)
        backend = qwen_like.backend_tokenizer
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
            extra_special_tokens=image_tokens, model_max_length=spec.max_position_embeddings,
        )
        specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", *INTERNVL_SPECIAL_TOKENS]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials]},
        replace_extra_special_tokens=False,
    )
    if spec.backbone == "llama":
        bos_id = tokenizer.convert_tokens_to_ids("<s>")
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)],
        )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------

def text_config(spec: DemoSpec, vocab_size: int, tokenizer) -> dict:
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = {
        "model_type": spec.backbone,
        "architectures": ["Qwen2ForCausalLM" if spec.backbone == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": spec.initializer_range,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "eos_token_id": eos_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if spec.head_dim is not None:
        config["head_dim"] = spec.head_dim
    if spec.backbone == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False)
    return config


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
        "initializer_range": spec.initializer_range,
    }


def tokens_per_tile(spec: DemoSpec, downsample_ratio: float = 0.5) -> int:
    return int((spec.image_size // spec.patch_size) ** 2 * downsample_ratio**2)


def random_tensor(name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """A tensor that depends only on its name and shape, so every build gives the same bytes."""
    seed = int.from_bytes(hashlib.md5(name.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator)
    leaf = name.rsplit(".", 2)
    is_norm = any(key in name for key in ("norm", "layernorm"))
    if is_norm and name.endswith(".weight"):
        return 1.0 + 0.1 * values
    if "lambda_" in name:
        return 1.0 + 0.1 * values  # layer scale: keep both residual branches alive
    if leaf[-1] == "bias" and is_norm:
        return 0.05 * values
    if leaf[-2] in ("q_proj", "k_proj"):
        # Sharper attention, so the next token depends on the context and not only on the current
        # token: at one `std` everywhere, tiny models settle into repeating a single token.
        return 3 * std * values
    return std * values


def hf_parameter_shapes(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor transformers expects, read off a meta-device model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config_dict["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    return shapes


def save_weights(shapes: dict, std: float, out: Path, dtype: torch.dtype, shard_bytes: int | None) -> None:
    tensors = {name: random_tensor(name, shape, std).to(dtype).contiguous() for name, shape in sorted(shapes.items())}
    if shard_bytes is None:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_internvl(spec: DemoSpec, out: Path, dtype: torch.dtype, shard_bytes: int | None) -> None:
    from transformers import GotOcr2ImageProcessorPil

    tokenizer = build_tokenizer(spec)
    tokenizer.save_pretrained(out)
    vocab_size = len(tokenizer)
    image_seq_length = tokens_per_tile(spec)
    config = {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "text_config": text_config(spec, vocab_size, tokenizer),
        "vision_config": vision_config(spec),
        "image_token_id": tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        "image_seq_length": image_seq_length,
        "downsample_ratio": 0.5,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": spec.tie_word_embeddings,
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
    save_weights(hf_parameter_shapes(config), spec.initializer_range, out, dtype, shard_bytes)


BUILDERS = {"internvl": build_internvl}


def build_demo_checkpoint(out: str | os.PathLike, arch: str = "internvl", size: str = "tiny",
                          backbone: str = "qwen2", dtype: str = "float32",
                          shard_bytes: int | None = None) -> Path:
    """Writes the checkpoint folder and returns its path. Safe to call on an existing folder."""
    key = (arch, size, backbone)
    if key not in SPECS:
        known = ", ".join("/".join(k) for k in SPECS)
        raise ValueError(f"no demo checkpoint for arch={arch} size={size} backbone={backbone}; known: {known}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    BUILDERS[arch](SPECS[key], out, getattr(torch, dtype), shard_bytes)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="internvl", choices=sorted(BUILDERS))
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--backbone", default="qwen2", choices=["qwen2", "llama"],
                        help="language model backbone (tiny only offers both)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shard_mb", type=float, default=None,
                        help="split the weights into safetensors shards of about this many MB")
    parser.add_argument("--out", required=True, help="folder to write the checkpoint into")
    args = parser.parse_args(argv)
    shard_bytes = None if args.shard_mb is None else int(args.shard_mb * 2**20)
    path = build_demo_checkpoint(args.out, args.arch, args.size, args.backbone, args.dtype, shard_bytes)
    print(f"wrote a random-weight {args.arch} {args.size} ({args.backbone}) checkpoint to {path}")


if __name__ == "__main__":
    main()
