"""The LLaVA / LLaVA-NeXT processors: ids and pixel values equal transformers' processor's, NeXT's token
count follows from the image size alone as transformers counts it, the weight map takes every layout,
sparse (transformers 4) configs get transformers' defaults, and inconsistent checkpoints fail with a
message naming the problem."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaNextConfig as HFLlavaNextConfig

from lightvlm.models.checkpoint import CheckpointError, LoadedCheckpoint
from lightvlm.models.llava.anyres import anyres_layout
from lightvlm.models.llava.config import LlavaConfig, LlavaNextConfig
from lightvlm.models.llava.weights import rename
from lightvlm.models.processor import decode_image

from helpers import image_bytes, load_image
from hf_reference import hf_messages
from llava_references import REFERENCES, hf_inputs

NAMES = ["coffee.jpg", "coffee_strip_600x40.jpg", "camera_gray.png", "chelsea_rgba.png", "coffee_palette.png",
         "astronaut_10x10.png", "rocket.jpg"]


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference(request, llava_checkpoints):
    return llava_checkpoints.get(request.param)


def test_ids_and_pixel_values_equal_transformers(reference):
    processor = LoadedCheckpoint.open(reference).processor
    images = [decode_image(image_bytes(n)) for n in NAMES] + [load_image("coffee.jpg").rotate(90, expand=True)]
    inputs = hf_inputs(reference, hf_messages("Describe them all.", images))
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images),
                                             {"type": "text", "text": "Describe them all."}]}]
    prompt = processor.encode_chat(messages, [processor.image_grid(*im.size) for im in images])
    ids = [processor.image_token_id if item >= 2**40 else item for item in prompt.input_ids]
    assert ids == inputs["input_ids"][0].tolist()
    expected = inputs["pixel_values"]
    for i, (image, item) in enumerate(zip(images, prompt.images)):
        pixels = processor.preprocess(image, item.grid)
        reference_pixels = expected[i, :len(pixels)] if expected.dim() == 5 else expected[i:i + 1]
        assert pixels.shape == tuple(reference_pixels.shape)
        np.testing.assert_array_equal(pixels, reference_pixels.numpy(), err_msg=NAMES[i] if i < len(NAMES) else "")


def test_multi_turn_chat_ids_equal_transformers(reference):
    """An assistant turn goes through the template's {% generation %} block (the Llama checkpoints')."""
    processor = LoadedCheckpoint.open(reference).processor
    image = load_image("chelsea.png")
    hf_turns = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": [{"type": "text", "text": "Its color?"}]}]
    ours = [{**turn, "content": [{"type": "image"} if part["type"] == "image" else part for part in turn["content"]]}
            for turn in hf_turns]
    prompt = processor.encode_chat(ours, [processor.image_grid(*image.size)])
    ids = [processor.image_token_id if item >= 2**40 else item for item in prompt.input_ids]
    assert ids == hf_inputs(reference, hf_turns)["input_ids"][0].tolist()


@pytest.fixture(scope="module")
def real_next_processor(llava_checkpoints):
    """transformers' LLaVA-NeXT processor with llava-v1.6's geometry: 336-pixel crops of 14-pixel patches."""
    tokenizer = AutoTokenizer.from_pretrained(llava_checkpoints.get("next_llama"))
    return LlavaNextProcessor(LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                         crop_size={"height": 336, "width": 336}),
                              tokenizer, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000))
def test_next_token_count_from_the_size_alone_equals_transformers(real_next_processor, width, height):
    pinpoints = tuple(tuple(p) for p in real_next_processor.image_processor.image_grid_pinpoints)
    layout = anyres_layout(width, height, pinpoints, 336, 24)
    expected = real_next_processor._get_num_multimodal_tokens(image_sizes=[[height, width]])["num_image_tokens"][0]
    assert 24 * 24 + layout.num_rows == expected


def test_grids_follow_the_aspect_ratio(llava_checkpoints):
    processor = LoadedCheckpoint.open(llava_checkpoints.get("next_llama")).processor
    assert processor.image_grid(600, 40)[:2] == (1, 3)  # wide: one row of three crops
    assert processor.image_grid(40, 600)[:2] == (3, 1)
    assert processor.image_grid(500, 500)[:2] == (2, 2)
    rows, columns, height, width = processor.image_grid(600, 40)
    assert height < rows * 4 and width == columns * 4  # letterbox rows cut away, all columns kept


@pytest.mark.parametrize(("checkpoint_name", "ours"), [
    ("model.vision_tower.embeddings.patch_embedding.weight",
     ("visual", "vision_tower.embeddings.patch_embedding.weight")),
    ("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias",
     ("visual", "vision_tower.encoder.layers.0.mlp.fc1.bias")),
    ("vision_tower.vision_model.pre_layrnorm.weight", ("visual", "vision_tower.pre_layrnorm.weight")),
    ("model.multi_modal_projector.linear_1.weight", ("visual", "multi_modal_projector.linear_1.weight")),
    ("multi_modal_projector.linear_2.bias", ("visual", "multi_modal_projector.linear_2.bias")),
    ("model.image_newline", ("visual", "image_newline")),
    ("image_newline", ("visual", "image_newline")),
    ("model.language_model.layers.1.self_attn.q_proj.weight",
     ("language", "language_model.layers.1.self_attn.q_proj.weight")),
    ("language_model.model.norm.weight", ("language", "language_model.norm.weight")),
    ("language_model.lm_head.weight", ("language", "lm_head.weight")),
    ("lm_head.weight", ("language", "lm_head.weight")),
    ("model.vision_tower.post_layernorm.weight", ("visual", "vision_tower.post_layernorm.weight")),
    ("something.else", None),
])
def test_weight_names_of_every_layout(checkpoint_name, ours):
    assert rename(checkpoint_name) == ours


def test_sparse_config_gets_transformers_defaults():
    """llava-1.5-7b-hf's config.json as transformers 4 wrote it: only non-default fields."""
    hf = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
          "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
          "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                          "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                          "vocab_size": 32064},
          "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                            "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                            "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
          "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    ours = LlavaConfig.from_hf(hf)
    theirs = HFLlavaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "ignore_index")})
    text, vision = theirs.text_config, theirs.vision_config
    assert (ours.text.hidden_size, ours.text.intermediate_size, ours.text.num_layers, ours.text.num_heads,
            ours.text.num_kv_heads, ours.text.vocab_size, ours.text.max_position_embeddings, ours.text.rms_norm_eps,
            ours.text.rope_theta) == (text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                                      text.num_attention_heads, text.num_key_value_heads, text.vocab_size,
                                      text.max_position_embeddings, text.rms_norm_eps,
                                      text.rope_parameters["rope_theta"])
    assert (ours.vision.hidden_act, ours.vision.layer_norm_eps, ours.vision.num_channels) == (
        vision.hidden_act, vision.layer_norm_eps, vision.num_channels)
    assert ours.feature_layers == (-2,) and ours.tokens_per_crop == 576


def edited(model_dir, tmp_path, config=None, processor=None):
    out = tmp_path / "edited"
    shutil.copytree(model_dir, out)
    for name, edit in (("config.json", config), ("processor_config.json", processor)):
        if edit:
            data = json.loads((out / name).read_text())
            edit(data)
            (out / name).write_text(json.dumps(data))
    return out


def test_inconsistent_checkpoints_fail_with_a_message(llava_checkpoints, tmp_path):
    next_dir = llava_checkpoints.get("next_llama")
    cases = [
        (dict(config=lambda c: c.update(vision_feature_select_strategy="full"),
              processor=lambda p: p.update(vision_feature_select_strategy="full")),
         "only vision_feature_select_strategy"),
        (dict(processor=lambda p: p.update(num_additional_image_tokens=0)), "counts 15 image tokens per crop"),
        (dict(processor=lambda p: p["image_processor"].update(image_grid_pinpoints=[[64, 64]])), "must agree"),
        (dict(config=lambda c: c.update(image_grid_pinpoints=[[48, 64]])), "multiples of the vision tower's"),
        (dict(processor=lambda p: p["image_processor"].update(crop_size={"height": 64, "width": 64})),
         "must come out at the vision tower's 32 x 32"),
        (dict(config=lambda c: c["vision_config"].update(model_type="siglip_vision_model")),
         "unsupported vision tower 'siglip_vision_model'"),
        (dict(config=lambda c: c.update(vision_feature_layer=7)), "vision_feature_layer 7 is out of range"),
    ]
    for i, (edits, message) in enumerate(cases):
        folder = edited(next_dir, tmp_path / str(i), **edits)
        with pytest.raises(CheckpointError, match=message):
            LoadedCheckpoint.open(folder)


def test_llava_crop_must_match_the_tower(llava_checkpoints, tmp_path):
    folder = edited(llava_checkpoints.get("llava_llama"), tmp_path,
                    processor=lambda p: p["image_processor"].update(do_center_crop=False))
    with pytest.raises(CheckpointError, match="varying size"):
        LoadedCheckpoint.open(folder)


def test_next_config_reads_pinpoints_and_defaults_as_transformers():
    hf = {"text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "vocab_size": 100}}
    ours, theirs = LlavaNextConfig.from_hf(hf), HFLlavaNextConfig(**hf)
    assert ours.grid_pinpoints == tuple(tuple(p) for p in theirs.image_grid_pinpoints)
    assert ours.vision.image_size == theirs.vision_config.image_size == 336
    assert ours.text.num_kv_heads == theirs.text_config.num_key_value_heads  # Qwen2Config's default, 32
    assert ours.text.max_position_embeddings == theirs.text_config.max_position_embeddings
    assert ours.feature_layers == (theirs.vision_feature_layer,)
