"""Our Qwen-VL processor builds the ids, pixel values and grids transformers' processors build, for
every resolution bound; requests may only lower the server's bounds; InternVL takes none."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from lightvlm.models.checkpoint import CheckpointError, LoadedCheckpoint
from lightvlm.models.processor import PromptError, split_messages
from lightvlm.models.qwen_vl.processor import smart_resize

from helpers import load_image
from qwen_vl_references import hf_inputs, messages

ALL_IMAGES = ["coffee.jpg", "chelsea.png", "chelsea_rgba.png", "coffee_palette.png", "camera_gray.png",
              "coffee_strip_600x40.jpg", "astronaut_10x10.png", "coffee.webp", "rocket.jpg"]


@pytest.fixture(scope="module")
def processors():
    return {}


@pytest.fixture
def ours(qwen_vl_reference, processors):
    if qwen_vl_reference not in processors:
        processors[qwen_vl_reference] = LoadedCheckpoint.open(qwen_vl_reference).make_processor()
    return processors[qwen_vl_reference]


def conversation(images):
    """Three turns with a system prompt, images in the first and the third."""
    return [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [{"type": "image", "image": images[0]},
                                     {"type": "text", "text": "What is this? Answer in one word."}]},
        {"role": "assistant", "content": "A cup."},
        {"role": "user", "content": [{"type": "text", "text": "And here, which colors do you see?"},
                                     *({"type": "image", "image": im} for im in images[1:])]},
    ]


def encode(processor, conv, **bounds):
    """Our ids, pixel values and grids for an HF-style conversation."""
    templated, images = split_messages(conv)
    grids = [processor.image_grid(*im.size, **bounds) for im in images]
    prompt = processor.encode_chat(templated, grids)
    pixels = np.concatenate([processor.preprocess(im, g) for im, g in zip(images, grids)]) if images else None
    return prompt, pixels, grids


def assert_same_as_transformers(model_dir, processor, conv, **bounds):
    prompt, pixels, grids = encode(processor, conv, **bounds)
    reference = hf_inputs(model_dir, conv, **bounds)
    assert prompt.input_ids == reference["input_ids"][0].tolist()
    if pixels is None:
        assert "pixel_values" not in reference
        return prompt
    assert [list(g) for g in grids] == reference["image_grid_thw"].tolist()
    assert pixels.shape == tuple(reference["pixel_values"].shape)
    assert torch.equal(torch.from_numpy(pixels), reference["pixel_values"])
    is_image = reference["mm_token_type_ids"][0] == 1  # where transformers' model splices image rows
    rows = [i for item in prompt.images for i in range(item.offset, item.offset + item.num_rows)]
    assert rows == torch.nonzero(is_image).flatten().tolist()
    return prompt


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_one_image_gives_transformers_ids_pixels_and_grid(ours, qwen_vl_reference, name):
    assert_same_as_transformers(qwen_vl_reference, ours, messages("Describe this image.", [load_image(name)]))


def test_text_only_and_multi_turn_with_images_of_other_shapes(ours, qwen_vl_reference):
    assert_same_as_transformers(qwen_vl_reference, ours, messages("Just text, please.", []))
    images = [load_image("coffee_strip_600x40.jpg"), load_image("chelsea.png"), load_image("camera_gray.png")]
    prompt = assert_same_as_transformers(qwen_vl_reference, ours, conversation(images))
    assert len({item.grid for item in prompt.images}) == 3  # three different grids in one prompt


def test_lower_bounds_per_request_give_transformers_grids(ours, qwen_vl_reference):
    image = load_image("rocket.jpg")
    factor = ours.patch_size * ours.merge_size
    default = assert_same_as_transformers(qwen_vl_reference, ours, messages("Hi.", [image]))
    lowered = assert_same_as_transformers(qwen_vl_reference, ours, messages("Hi.", [image]),
                                          **ours.check_pixel_bounds(max_pixels=factor * factor * 12))
    assert lowered.images[0].num_rows < default.images[0].num_rows
    tiny = load_image("astronaut_10x10.png")  # upscaled to min_pixels, a lower floor gives fewer rows
    floor = assert_same_as_transformers(qwen_vl_reference, ours, messages("Hi.", [tiny]),
                                        **ours.check_pixel_bounds(min_pixels=factor * factor))
    assert floor.images[0].num_rows < assert_same_as_transformers(
        qwen_vl_reference, ours, messages("Hi.", [tiny])).images[0].num_rows


def test_requests_may_only_lower_the_bounds(ours):
    with pytest.raises(PromptError, match=f"above this server's bound of {ours.max_pixels}"):
        ours.check_pixel_bounds(max_pixels=ours.max_pixels + 1)
    with pytest.raises(PromptError, match=f"min_pixels={ours.min_pixels + 1} is above this server's bound"):
        ours.check_pixel_bounds(min_pixels=ours.min_pixels + 1)
    with pytest.raises(PromptError, match="min_pixels .* is above max_pixels"):
        ours.check_pixel_bounds(max_pixels=ours.min_pixels - 1)
    for bad in (0, -5, 1.5, "100", True):
        with pytest.raises(PromptError, match="positive integer"):
            ours.check_pixel_bounds(max_pixels=bad)
    assert ours.check_pixel_bounds() == {}
    assert ours.check_pixel_bounds(max_pixels=ours.max_pixels) == {"min_pixels": ours.min_pixels,
                                                                   "max_pixels": ours.max_pixels}


def test_server_bounds_replace_the_checkpoints(ours, qwen_vl_reference):
    factor = ours.patch_size * ours.merge_size
    server = ours.with_pixel_bounds(max_pixels=factor * factor * 10)
    assert (server.min_pixels, server.max_pixels) == (ours.min_pixels, factor * factor * 10)
    assert ours.max_pixels != server.max_pixels  # a copy: the checkpoint's processor is unchanged
    conv = messages("Hi.", [load_image("coffee.jpg")])
    assert_same_as_transformers(qwen_vl_reference, server, conv, max_pixels=factor * factor * 10)
    with pytest.raises(PromptError, match=f"bound of {factor * factor * 10}"):
        server.check_pixel_bounds(max_pixels=factor * factor * 11)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        ours.with_pixel_bounds(min_pixels=100, max_pixels=50)


def test_internvl_takes_no_pixel_bounds(tiny_qwen2):
    processor = LoadedCheckpoint.open(tiny_qwen2).processor
    with pytest.raises(PromptError, match="fixed-size tiles"):
        processor.check_pixel_bounds(max_pixels=1000)
    with pytest.raises(ValueError, match="--min_pixels / --max_pixels"):
        processor.with_pixel_bounds(max_pixels=1000)
    assert processor.check_pixel_bounds() == {} and processor.with_pixel_bounds() is processor


def test_smart_resize_is_transformers_step_for_step():
    sizes = [(10, 10), (40, 600), (600, 40), (300, 451), (1, 150), (2000, 3000), (27, 29), (28, 28), (3, 500)]
    for height, width in sizes:
        for factor, low, high in ((28, 56 * 56, 28 * 28 * 1280), (32, 32 * 32 * 4, 32 * 32 * 40), (28, 1, 784)):
            assert smart_resize(height, width, factor, low, high) == hf_smart_resize(height, width, factor, low, high)


def test_too_long_and_thin_images_are_refused(ours):
    with pytest.raises(PromptError, match="aspect ratio must be at most 200"):
        ours.image_grid(2010, 10)


def test_raw_prompt_placeholders_expand_like_the_chat_template(ours, qwen_vl_reference):
    images = [load_image("chelsea.png"), load_image("coffee_strip_600x40.jpg")]
    grids = [ours.image_grid(*im.size) for im in images]
    chat = ours.encode_chat(*split_messages(messages("Two pictures.", images))[:1], grids)
    text = ours.apply_chat_template(split_messages(messages("Two pictures.", images))[0])
    for placeholder in ("<image>", "<img></img>", "<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>"):
        raw = text.replace("<|vision_start|><|image_pad|><|vision_end|>", placeholder)
        prompt = ours.encode(raw, grids)
        assert prompt.input_ids == chat.input_ids, placeholder
        assert prompt.images == chat.images
    with pytest.raises(PromptError, match="2 image placeholder"):
        ours.encode("<image><image>", grids[:1])


def test_grid_mismatch_with_the_vision_tower_is_refused(qwen_vl_reference, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_vl_reference, broken)
    path = broken / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["merge_size"] = 4
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="merge_size.*must agree"):
        LoadedCheckpoint.open(broken)


def test_moe_variants_are_refused_by_name(qwen_vl_reference, tmp_path):
    moe = tmp_path / "moe"
    shutil.copytree(qwen_vl_reference, moe)
    config = json.loads((moe / "config.json").read_text())
    config["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
    (moe / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mixture-of-experts models are not supported yet"):
        LoadedCheckpoint.open(moe)

