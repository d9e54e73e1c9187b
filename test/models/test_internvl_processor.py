"""Our InternVL processor builds the ids and pixels transformers' InternVLProcessor builds."""

import numpy as np
import pytest
import torch

from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.internvl.processor import InternVLProcessor, best_grid, candidate_grids
from lightvlm.models.processor import PromptError, split_messages

from helpers import grids, load_image
from hf_reference import hf_processor

ALL_IMAGES = ["coffee.jpg", "chelsea.png", "chelsea_rgba.png", "coffee_palette.png", "camera_gray.png",
              "coffee_strip_600x40.jpg", "astronaut_10x10.png", "coffee.webp", "rocket.jpg"]


@pytest.fixture(scope="module")
def processors():
    return {}


@pytest.fixture
def ours(tiny_checkpoint, processors):
    if tiny_checkpoint not in processors:
        ckpt = LoadedCheckpoint.open(tiny_checkpoint)
        processors[tiny_checkpoint] = ckpt.make_processor()
    return processors[tiny_checkpoint]


def conversation(images):
    """Three turns, images in the first and the third, system prompt, OpenAI-style parts."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": images[0]},
                                     {"type": "text", "text": "What is this? Answer in one word."}]},
        {"role": "assistant", "content": "A cup."},
        {"role": "user", "content": [{"type": "text", "text": "And here, which colors do you see?"},
                                     *({"type": "image", "image": im} for im in images[1:])]},
    ]




@pytest.mark.parametrize("name", ALL_IMAGES)
def test_ids_and_pixels_equal_transformers(ours, tiny_checkpoint, name):
    images = [load_image(name), load_image("rocket.jpg")]
    messages = conversation(images)
    reference = hf_processor(tiny_checkpoint).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    templated, sources = split_messages(messages)
    prompt = ours.encode_chat(templated, grids(ours, sources))
    assert prompt.input_ids == reference["input_ids"][0].tolist()
    pixels = np.concatenate([ours.preprocess(im, grid) for im, grid in zip(sources, grids(ours, sources))])
    assert torch.equal(torch.from_numpy(pixels), reference["pixel_values"])
    # spans point at the <IMG_CONTEXT> rows, one span per image, in order
    context_id = ours.image_token_id
    rows = [i for i, t in enumerate(prompt.input_ids) if t == context_id]
    assert rows == [s.offset + j for s in prompt.images for j in range(s.num_rows)]


def test_text_only_and_raw_prompt(ours, tiny_checkpoint):
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    reference = hf_processor(tiny_checkpoint).apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)
    assert ours.encode_chat(messages, []).input_ids == reference["input_ids"][0]


def test_placeholders_of_the_native_api(ours):
    """<img></img>, <image> and <IMG_CONTEXT> all mark an image; each expands to the same span."""
    grid = ours.image_grid(300, 200)
    spans = [ours.encode(f"A {tag} B", [grid]).input_ids for tag in ("<img></img>", "<image>", "<IMG_CONTEXT>")]
    assert spans[0] == spans[1] == spans[2]
    with pytest.raises(PromptError, match="2 image placeholder.*1 image"):
        ours.encode("<image><image>", [grid])


def test_tiling_follows_the_aspect_ratio(ours):
    assert ours.num_tiles(ours.image_grid(10, 10)) == 1  # one tile, no thumbnail
    columns, rows = ours.image_grid(600, 40)
    assert columns > rows and ours.num_tiles((columns, rows)) == columns * rows + 1
    _, _, num_rows = ours.image_span((columns, rows))
    assert num_rows == (columns * rows + 1) * ours.tokens_per_tile


def test_grid_choice_equals_transformers_on_many_sizes():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    assert candidate_grids(1, 4)[:3] == [(1, 1), (1, 2), (2, 1)]
    sizes = [(w, h) for w in (10, 40, 100, 300, 448, 600, 896, 1000, 1344, 3000) for h in (10, 40, 223, 448, 872, 2000)]
    for width, height in sizes:
        for min_tiles, max_tiles in ((1, 12), (1, 6), (2, 4)):
            expected = get_optimal_tiled_canvas((height, width), (448, 448), min_tiles, max_tiles)
            assert best_grid(width, height, 448, min_tiles, max_tiles) == expected, (width, height, max_tiles)


def test_image_length_env_must_match_the_checkpoint(tiny_qwen2, monkeypatch):
    ckpt = LoadedCheckpoint.open(tiny_qwen2)
    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", str(ckpt.config.tokens_per_tile))
    assert InternVLProcessor(tiny_qwen2, ckpt.config).tokens_per_tile == ckpt.config.tokens_per_tile
    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "256")
    with pytest.raises(ValueError, match=f"INTERNVL_IMAGE_LENGTH=256 contradicts the checkpoint.*gives "
                                         f"{ckpt.config.tokens_per_tile} tokens per tile"):
        InternVLProcessor(tiny_qwen2, ckpt.config)


def test_image_tags_written_as_text_in_a_chat_are_text(ours, tiny_checkpoint):
    messages = [{"role": "user", "content": "In HTML, what does <image> or <img></img> mean?"}]
    reference = hf_processor(tiny_checkpoint).apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=True, return_dict=True)
    assert ours.encode_chat(messages, []).input_ids == reference["input_ids"][0]


def test_tiling_is_on_whatever_processor_config_says(tiny_qwen2, tmp_path):
    """transformers' InternVLProcessor always crops to tiles; a crop_to_patches key changes nothing."""
    import json
    import shutil

    copy = tmp_path / "no-crop"
    shutil.copytree(tiny_qwen2, copy)
    config = json.loads((copy / "processor_config.json").read_text())
    (copy / "processor_config.json").write_text(json.dumps({**config, "crop_to_patches": False}))
    processor = LoadedCheckpoint.open(copy).processor
    assert processor.num_tiles(processor.image_grid(400, 100)) > 1


def test_templates_see_no_tools_and_no_documents(ours):
    from lightvlm.models.processor import compile_chat_template

    template = compile_chat_template("{% if tools is not none %}[TOOLS]{% endif %}{{ messages[0]['content'] }}")
    ours_template, ours.chat_template = ours.chat_template, template
    try:
        assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    finally:
        ours.chat_template = ours_template
