"""What every family's demo builder shares: a byte-level BPE tokenizer trained on the bundled corpus,
the language model's config, and deterministic random weights saved in the Hugging Face layout.

The weights are random. Norm weights and layer scales sit near 1, and everything else is drawn with
the config's `initializer_range` (about 0.1 for tiny models; query and key projections three times
that), so that greedy decoding wanders through the vocabulary instead of repeating one token, and a
wrong op anywhere changes the tokens.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")

# Qwen2's pre-tokenizer pattern (contractions, letters, single digits, punctuation runs, newlines).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class TextSpec:
    """The language model of a demo checkpoint. `backbone` picks its family ("qwen2" | "llama")."""

    backbone: str
    vocab_target: int  # BPE vocabulary size asked of the trainer (before special tokens)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    initializer_range: float
    tie_word_embeddings: bool
    head_dim: int | None = None
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 8192


# --------------------------------------------------------------------------------------------------
# Tokenizer
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


def build_tokenizer(spec: TextSpec, family_tokens: list[str], named_tokens: dict[str, str], chat_template: str):
    """A transformers tokenizer over the trained BPE, with the family's special tokens (`named_tokens`
    become attributes such as `context_image_token`) and its chat template. The llama backbone gets
    `<s>` prepended by its post-processor, as InternLM2-based checkpoints do."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    vocab, merges = train_bpe(spec.vocab_target)
    if spec.backbone == "qwen2":
        tokenizer = Qwen2Tokenizer(
            vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens=named_tokens, model_max_length=spec.max_position_embeddings,
        )
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *family_tokens]
    else:
        qwen_like = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=qwen_like.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>",
            extra_special_tokens=named_tokens, model_max_length=spec.max_position_embeddings,
        )
        specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", *family_tokens]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials]},
        replace_extra_special_tokens=False,
    )
    if spec.backbone == "llama":
        bos_id = tokenizer.convert_tokens_to_ids("<s>")
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)],
        )
    tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------------

def text_config(spec: TextSpec, vocab_size: int, tokenizer) -> dict:
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


def hf_parameter_shapes(config_dict: dict, auto_class: str = "AutoModelForImageTextToText") -> dict[str, tuple]:
    """Names and shapes of every tensor transformers expects, read off a meta-device model."""
    import transformers

    config = transformers.AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config)
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
