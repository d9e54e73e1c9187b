"""The demo checkpoints: Hugging Face layout, deterministic bytes, sizes, and transformers loads them."""

import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open

from lightvlm.models.demo import build_demo_checkpoint, main

from hf_reference import hf_generate, hf_messages, hf_model

HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "preprocessor_config.json", "processor_config.json"}


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def num_parameters(folder) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def test_same_command_writes_same_bytes(tiny_qwen2, tmp_path):
    main(["--arch", "internvl", "--size", "tiny", "--out", str(tmp_path / "again")])
    assert digest(tmp_path / "again") == digest(tiny_qwen2)


def test_layout_is_hugging_face(tiny_checkpoint):
    assert {p.name for p in tiny_checkpoint.iterdir()} >= HF_FILES
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    tokenizer_config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["context_image_token"] == "<IMG_CONTEXT>"
    assert "<|im_start|>" in (tiny_checkpoint / "chat_template.jinja").read_text()


def test_tiny_checkpoints_are_under_a_million_parameters(tiny_qwen2, tiny_llama):
    assert num_parameters(tiny_qwen2) < 1_000_000
    assert num_parameters(tiny_llama) < 1_000_000


def test_second_tiny_checkpoint_has_other_shapes(tiny_qwen2, tiny_llama):
    a = json.loads((tiny_qwen2 / "config.json").read_text())
    b = json.loads((tiny_llama / "config.json").read_text())
    ta, tb = a["text_config"], b["text_config"]
    assert (ta["model_type"], tb["model_type"]) == ("qwen2", "llama")
    assert ta["num_attention_heads"] != tb["num_attention_heads"]
    def gqa(t):
        return t["num_attention_heads"] // t["num_key_value_heads"]

    assert gqa(ta) != gqa(tb)
    assert ta["num_hidden_layers"] != tb["num_hidden_layers"]
    assert a["vision_config"]["image_size"] != b["vision_config"]["image_size"]


def test_transformers_loads_and_generates_varied_text(tiny_checkpoint):
    model = hf_model(tiny_checkpoint)
    assert not model.training
    ids, _ = hf_generate(tiny_checkpoint, hf_messages("Describe the cat on the table.", []), 30)
    assert len(set(ids)) > len(ids) // 3, f"greedy output is degenerate: {ids}"


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_sharded_and_bf16_variants(tmp_path, dtype):
    out = build_demo_checkpoint(tmp_path / "sharded", dtype=dtype, shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    with safe_open(out / next(iter(index["weight_map"].values())), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16


def test_small_checkpoint_has_real_internvl_geometry_and_loads_in_transformers(small_checkpoint):
    assert 20_000_000 <= num_parameters(small_checkpoint) <= 40_000_000
    config = json.loads((small_checkpoint / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    assert vision["image_size"] == [448, 448] and vision["patch_size"] == [14, 14]
    assert config["image_seq_length"] == 256 and text["hidden_size"] == 512 and text["num_hidden_layers"] == 6
    assert json.loads((small_checkpoint / "preprocessor_config.json").read_text())["max_patches"] == 12
    ids, _ = hf_generate(small_checkpoint, hf_messages("Describe the picture.", []), 8)
    assert len(ids) >= 1
