"""Loading checkpoints in every layout: the original InternVL folder's facts, fused tensors, pixel
shuffle versions, and the start-up errors a user meets (each names what it found and where)."""

import json
import shutil

import pytest
import torch
from transformers.models.internvl.modeling_internvl import InternVLModel

from lightvlm.common.distributed import TPGroup
from lightvlm.engine.visual_encoder import VisualEncoder
from lightvlm.models.checkpoint import CheckpointError, LoadedCheckpoint, checkpoint_tensors
from lightvlm.models.internvl.model import pixel_shuffle
from lightvlm.models.layers.linear import QKVParallelLinear

from layouts import pack_wqkv


def edited(src, tmp_path, name, **edits):
    """A copy of checkpoint `src` with JSON files edited: file name -> function(dict) (in place)."""
    out = tmp_path / name
    shutil.copytree(src, out)
    for file, edit in edits.items():
        path = out / file.replace("__", ".")
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return out


def original_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    """OpenGVLab's InternVLChatModel.pixel_shuffle, transcribed (x: [n, w, h, c])."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_versions_equal_internvl_code(version):
    x = torch.randn(3, 8, 8, 5)
    ours = pixel_shuffle(x, 2, version)
    assert torch.equal(ours, original_pixel_shuffle(x, 0.5, version))
    if version == "v2":  # transformers has only v2
        assert torch.equal(ours, InternVLModel.pixel_shuffle(None, x, 0.5))
    else:
        assert not torch.equal(ours, pixel_shuffle(x, 2, "v2"))


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_fused_qkv_loads_as_its_three_parts_on_every_rank(tp_size):
    """InternLM2's wqkv (grouped per KV head) and InternViT's qkv ([q; k; v]) give each rank the slice
    that q_proj, k_proj and v_proj would (KV heads replicated when there are fewer than ranks)."""
    heads, kv_heads, head_dim, hidden = 8, 2, 4, 16
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * head_dim, hidden, generator=generator) for n in (heads, kv_heads, kv_heads))
    biases = [torch.randn(t.shape[0], generator=generator) for t in (q, k, v)]
    fused = {"qkv_grouped": (pack_wqkv(q, k, v, kv_heads), pack_wqkv(*biases, kv_heads)),
             "qkv_concatenated": (torch.cat([q, k, v]), torch.cat(biases))}
    for rank in range(tp_size):
        tp = TPGroup(rank, tp_size)
        split = QKVParallelLinear(hidden, head_dim, heads, kv_heads, True, tp)
        for part, weight, bias in zip("qkv", (q, k, v), biases):
            split.weight.weight_loader(split.weight, weight, part)
            split.bias.weight_loader(split.bias, bias, part)
        for layout, (weight, bias) in fused.items():
            layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, True, tp)
            layer.weight.weight_loader(layer.weight, weight, layout)
            layer.bias.weight_loader(layer.bias, bias, layout)
            assert torch.equal(layer.weight, split.weight) and torch.equal(layer.bias, split.bias), (layout, rank)
    with pytest.raises(ValueError, match="fused qkv has 40 rows, the model needs"):
        QKVParallelLinear(hidden, head_dim, heads, 4, False).weight.weight_loader(
            split.weight, fused["qkv_grouped"][0][:40], "qkv_grouped")


def test_original_internlm2_folder_is_read_as_internlm2(references):
    model_dir = references("original-internlm2")
    names = checkpoint_tensors(model_dir)
    assert "language_model.model.layers.0.attention.wqkv.weight" in names and "language_model.output.weight" in names
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in names and "mlp1.1.weight" in names
    ckpt = LoadedCheckpoint.open(model_dir)
    text = ckpt.config.text
    assert (ckpt.family.name, text.model_type, text.qkv_bias, text.o_bias) == ("internvl_chat", "internlm2", True, True)
    assert text.rope_scaling["rope_type"] == "linear" and not text.tie_word_embeddings
    assert ckpt.config.image_token_id == ckpt.processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ckpt.config.vision.qk_norm_eps == ckpt.config.vision.layer_norm_eps
    assert ckpt.processor.tiling.source.startswith("config.json")  # its CLIP-style preprocessor file is not used


def test_original_tiling_keys_are_followed(references, tmp_path):
    def single_tile(config):
        config.update(dynamic_image_size=False)

    def no_thumbnail(config):
        config.update(use_thumbnail=False, min_dynamic_patch=2, max_dynamic_patch=3)

    src = references("original-qwen2")
    processor = LoadedCheckpoint.open(edited(src, tmp_path, "single", config__json=single_tile)).processor
    assert processor.image_grid(600, 40) == (1, 1) and processor.num_tiles((1, 1)) == 1
    processor = LoadedCheckpoint.open(edited(src, tmp_path, "thumbless", config__json=no_thumbnail)).processor
    grid = processor.image_grid(600, 40)
    assert grid == (3, 1) and processor.num_tiles(grid) == 3
    assert processor.preprocess(processor_image(), grid).shape[0] == 3
    columns, rows = processor.image_grid(100, 100)
    assert columns * rows == 2  # at least min_dynamic_patch tiles, even for a square


def processor_image():
    from helpers import load_image

    return load_image("coffee_strip_600x40.jpg")


def test_v1_pixel_shuffle_is_the_default_of_original_configs(references, tmp_path):
    model_dir = edited(references("original-qwen2"), tmp_path, "v1", config__json=lambda c: c.pop("ps_version"))
    assert LoadedCheckpoint.open(model_dir).config.ps_version == "v1"


ERRORS = {
    "force_image_size": (lambda c: c.update(force_image_size=448),
                         "force_image_size is 448 but vision_config.image_size is 112"),
    "ps_version": (lambda c: c.update(ps_version="v3"), "unknown ps_version 'v3'"),
    "lora": (lambda c: c.update(use_llm_lora=16), "use_llm_lora=16: InternVL checkpoints with LoRA"),
    "language model": (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]),
                       "'Phi3ForCausalLM'; supported language models of InternVLChatModel: InternLM2ForCausalLM"),
}


@pytest.mark.parametrize("what", list(ERRORS))
def test_original_config_errors_name_what_they_found(references, tmp_path, what):
    edit, message = ERRORS[what]
    model_dir = edited(references("original-qwen2"), tmp_path, "bad", config__json=edit)
    with pytest.raises(CheckpointError, match=message):
        LoadedCheckpoint.open(model_dir)


def test_image_length_env_is_validated_on_original_folders(references, monkeypatch):
    model_dir = references("original-qwen2")
    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "16")
    assert LoadedCheckpoint.open(model_dir).processor.tokens_per_tile == 16
    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "256")  # LightLLM's default, for 448-pixel tiles
    with pytest.raises(CheckpointError, match="INTERNVL_IMAGE_LENGTH=256 contradicts the checkpoint.*gives 16 tokens"):
        LoadedCheckpoint.open(model_dir)


def test_processor_and_model_mismatches_name_both_numbers(references, tmp_path):
    src = references("hf-llama")
    cases = {
        "tile": ({"processor_config__json": lambda c: c["image_processor"].update(size={"height": 448, "width": 448})},
                 "tile size is 448 .processor_config.json. but the vision tower's image_size is 96"),
        "seq": ({"processor_config__json": lambda c: c.update(image_seq_length=256)},
                "image_seq_length=256 but the vision tower gives 9 tokens per tile"),
        "token": ({"config__json": lambda c: c.update(image_token_id=3)},
                  r"image_token_id=3 but the tokenizer's <IMG_CONTEXT> is \d+"),
        "nothing": ({"processor_config__json": lambda c: c.pop("image_processor")},
                    "no image processor settings: looked for `image_processor` in processor_config.json "
                    r"\(transformers 5\) and for preprocessor_config.json \(transformers 4\)"),
    }
    for name, (edits, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            LoadedCheckpoint.open(edited(src, tmp_path, name, **edits))


def test_text_only_model_has_no_visual_half(references):
    ckpt = LoadedCheckpoint.open(references("text-qwen3"))
    assert not ckpt.is_multimodal and ckpt.config.text.qk_norm
    with pytest.raises(CheckpointError, match="text-only language model .Qwen3ForCausalLM.*without --enable_multi"):
        VisualEncoder(ckpt)


def test_a_tokenizer_that_names_checkpoint_code_is_read_without_running_it(references, tmp_path):
    """InternLM2 folders point AutoTokenizer at their own code (auto_map): its tokenizer.json is read by
    transformers' generic fast tokenizer; the code is never imported."""
    src = references("original-internlm2")

    def remote(config):
        config.update(tokenizer_class="InternLM2Tokenizer",
                      auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]})

    model_dir = edited(src, tmp_path, "remote-tokenizer", tokenizer_config__json=remote)
    (model_dir / "tokenization_internlm2.py").write_text("raise SystemExit('checkpoint code ran')\n")
    messages = [{"role": "user", "content": "Hello there, <image> is text here."}]
    ours = LoadedCheckpoint.open(model_dir).processor.encode_chat(messages, []).input_ids
    assert ours == LoadedCheckpoint.open(src).processor.encode_chat(messages, []).input_ids
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="names the checkpoint's own tokenizer code .InternLM2Tokenizer, "
                                              "auto_map. and the folder has no tokenizer.json"):
        LoadedCheckpoint.open(model_dir)


def test_eos_ids_come_from_where_transformers_takes_them(references, tmp_path):
    """generation_config.json, else the language config (here llm_config), else the tokenizer's
    eos_token; none of them is a start-up error."""
    src = references("original-qwen2")
    tokenizer = LoadedCheckpoint.open(src).processor.tokenizer
    im_end, endoftext = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert set(LoadedCheckpoint.open(src).eos_token_ids) == {im_end}  # generation_config.json's list
    model_dir = edited(src, tmp_path, "no-generation-config",
                       config__json=lambda c: c["llm_config"].update(eos_token_id=endoftext))
    (model_dir / "generation_config.json").unlink()
    assert LoadedCheckpoint.open(model_dir).eos_token_ids == (endoftext,)
    edit = tmp_path / "no-generation-config" / "config.json"
    config = json.loads(edit.read_text())
    del config["llm_config"]["eos_token_id"]
    edit.write_text(json.dumps(config))
    assert LoadedCheckpoint.open(model_dir).eos_token_ids == (im_end,)  # the tokenizer's eos_token
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "eos_token": None}))
    with pytest.raises(CheckpointError, match="names no EOS token: none in generation_config.json, config.json "
                                              "or the tokenizer's eos_token"):
        LoadedCheckpoint.open(model_dir)


def test_a_folder_without_chat_template_says_so_on_chats(references, tmp_path):
    from lightvlm.models.processor import PromptError

    model_dir = edited(references("text-qwen2"), tmp_path, "no-template")
    (model_dir / "chat_template.jinja").unlink()
    processor = LoadedCheckpoint.open(model_dir).processor
    assert processor.encode("Hello", []).input_ids  # raw prompts still work
    with pytest.raises(PromptError, match="has no chat template; send a raw prompt to /generate instead"):
        processor.encode_chat([{"role": "user", "content": "Hello"}], [])
