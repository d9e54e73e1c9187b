"""LLaVA and LLaVA-NeXT through the offline pipeline give transformers' greedy tokens, on checkpoints
transformers itself saved (llava_references.py): Llama and Qwen2 backbones, one and several vision
feature layers, the 'default' and 'full' feature strategies, pad-to-square and center crop, and for
NeXT images whose aspect ratios pick different pinpoints."""

import pytest
import torch

import lightvlm.engine.model_runner as model_runner
from lightvlm import GenerationConfig, pipeline

from helpers import load_image
from hf_reference import hf_messages
from llava_references import REFERENCES, assert_same_greedy, hf_generate, hf_inputs, hf_model, old_layout_copy

MAX_NEW = 32


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference(request, llava_checkpoints):
    return llava_checkpoints.get(request.param)


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.fixture
def pipe(reference, pipes):
    if reference not in pipes:
        pipes[reference] = pipeline(reference, max_batch_size=8, session_len=1024, max_total_token_num=8 * 1024,
                                    data_type="fp32")
    return pipes[reference]


def check(pipe, model_dir, text, images, max_new_tokens=MAX_NEW, response=None, label=""):
    reference, inputs = hf_generate(model_dir, hf_messages(text, images), max_new_tokens)
    if response is None:
        response = pipe((text, images) if images else text, GenerationConfig(max_new_tokens=max_new_tokens))
    assert response.input_token_len == inputs["input_ids"].shape[1]
    assert_same_greedy(model_dir, response.token_ids, reference, inputs, f"{model_dir.name}: {label or text}")
    return response


def tall_image():
    return load_image("coffee_strip_600x40.jpg").rotate(90, expand=True)  # 40 x 600


def test_one_image_matches_transformers(pipe, reference):
    check(pipe, reference, "Describe this image.", [load_image("coffee.jpg")])


def test_two_images_of_different_shapes_match_transformers(pipe, reference):
    wide, tall = load_image("coffee_strip_600x40.jpg"), tall_image()
    grids = [pipe.processor.image_grid(*image.size) for image in (wide, tall)]
    if reference.name.startswith("next"):
        assert grids[0] != grids[1]  # one pinpoint wide, one tall: different crops and unpadding
    check(pipe, reference, "What differs between these two pictures?", [wide, tall])


def test_batch_of_mixed_requests_matches_transformers(pipe, reference):
    requests = [("Hi.", []), ("What animal is shown in the photo?", [load_image("chelsea_rgba.png")]),
                ("Count the objects, please, and name their colors.", [load_image("camera_gray.png")]),
                ("Compare them.", [load_image("rocket.jpg"), load_image("astronaut_10x10.png")]),
                ("Read the text.", [load_image("coffee_palette.png")])]
    responses = pipe([(t, ims) if ims else t for t, ims in requests], GenerationConfig(max_new_tokens=24))
    assert len({r.input_token_len for r in responses}) == len(requests)
    for (text, images), response in zip(requests, responses):
        check(pipe, reference, text, images, 24, response, label=f"batch: {text}")


def test_first_step_logits_match_transformers(pipe, reference, monkeypatch):
    captured = []
    real_sample = model_runner.sample

    def spy(logits, batch):
        captured.append(logits.clone())
        return real_sample(logits, batch)

    monkeypatch.setattr(model_runner, "sample", spy)
    images = [load_image("chelsea.png"), tall_image()]
    pipe(("Describe these images.", images), GenerationConfig(max_new_tokens=1))
    inputs = hf_inputs(reference, hf_messages("Describe these images.", images))
    with torch.no_grad():
        expected = hf_model(reference)(**inputs).logits[0, -1]
    assert captured[0].shape == (1, expected.shape[0])
    assert torch.allclose(captured[0][0], expected, atol=1e-4, rtol=0), (captured[0][0] - expected).abs().max()


@pytest.mark.parametrize("name", ["llava_llama", "next_qwen2"])
def test_older_checkpoint_layout_loads_the_same_model(name, llava_checkpoints, tmp_path):
    """language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, top-level image_newline."""
    new = llava_checkpoints.get(name)
    old = old_layout_copy(new, tmp_path / name)
    images = [load_image("coffee.jpg"), tall_image()]
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    ours = pipeline(old, max_batch_size=2, session_len=1024, max_total_token_num=2048,
                    data_type="fp32")(("Describe.", images), config)
    reference, inputs = hf_generate(new, hf_messages("Describe.", images), MAX_NEW)
    assert_same_greedy(new, ours.token_ids, reference, inputs, f"{name} in the older layout")


def test_tp2_pipeline_matches_transformers(llava_checkpoints):
    """The language model split over two worker processes (6 heads over 2 KV heads on the Llama backbone)."""
    model_dir = llava_checkpoints.get("next_llama")
    requests = [("Describe this image.", [load_image("coffee.jpg")]),
                ("What differs?", [load_image("coffee_strip_600x40.jpg"), tall_image()]), ("Hello there!", [])]
    with pipeline(model_dir, tp=2, max_batch_size=4, session_len=1024, max_total_token_num=4096,
                  data_type="fp32") as pipe:
        responses = pipe([(t, ims) if ims else t for t, ims in requests], GenerationConfig(max_new_tokens=MAX_NEW))
    for (text, images), response in zip(requests, responses):
        reference, inputs = hf_generate(model_dir, hf_messages(text, images), MAX_NEW)
        assert response.input_token_len == inputs["input_ids"].shape[1]
        assert_same_greedy(model_dir, response.token_ids, reference, inputs, f"tp=2: {text}")
