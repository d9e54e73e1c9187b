"""The pipeline gives transformers' greedy tokens on checkpoints transformers wrote (test/references.py),
in every layout users have: InternVL as transformers 5 and 4.x save it, OpenGVLab's original
InternVLChatModel folders (InternLM2, Qwen2 and Llama backbones), and text-only LLMs.

The reference always runs in transformers on the HF folder the weights came from; InternLM2 is compared
with transformers' Llama on the unfused weights.
"""

import numpy as np
import pytest
import torch

from lightvlm import GenerationConfig, pipeline
from lightvlm.models.processor import split_messages

from hf_reference import assert_same_greedy, hf_inputs
from references import TEXT_CASES, reference_greedy, vlm_cases

MAX_NEW = 24
VLM = ["hf-qwen2", "hf-llama", "legacy-qwen2", "legacy-llama", "original-qwen2", "original-llama",
       "original-internlm2"]
# Every layout runs the cases as one batch; one checkpoint per backbone also runs them one by one (the
# layouts differ in loading only, which the batch proves as well as the single requests do).
ALONE = ["hf-qwen2", "hf-llama", "original-internlm2"]
TEXT = ["text-qwen2", "text-llama", "text-qwen3"]
# where each layout's image settings are read
SETTINGS_SOURCE = {"hf": "processor_config.json", "legacy": "preprocessor_config.json", "original": "config.json"}


@pytest.fixture(scope="module")
def pipes(references):
    """name -> (its reference folder, its pipeline), opened once per module."""
    opened = {}

    def get(name):
        if name not in opened:
            opened[name] = references.reference(name), pipeline(references(name), max_batch_size=8, session_len=2048,
                                                                max_total_token_num=8 * 2048, data_type="fp32")
        return opened[name]

    return get


def check(response, ref_dir, case, messages, label):
    reference, inputs = reference_greedy(ref_dir, case, messages, MAX_NEW)
    assert response.input_token_len == inputs["input_ids"].shape[1], label
    assert_same_greedy(ref_dir, response.token_ids, reference, inputs, label)


@pytest.mark.parametrize("name", ALONE)
def test_each_case_alone_matches_transformers(pipes, name):
    ref_dir, pipe = pipes(name)
    for case, messages in vlm_cases().items():
        check(pipe(messages, GenerationConfig(max_new_tokens=MAX_NEW)), ref_dir, case, messages, f"{name}: {case}")


@pytest.mark.parametrize("name", VLM)
def test_a_batch_of_the_cases_matches_transformers(pipes, name):
    ref_dir, pipe = pipes(name)
    assert pipe.processor.tiling.source.startswith(SETTINGS_SOURCE[name.split("-")[0]])
    cases = vlm_cases()
    responses = pipe(list(cases.values()), GenerationConfig(max_new_tokens=MAX_NEW))
    for (case, messages), response in zip(cases.items(), responses):
        check(response, ref_dir, case, messages, f"{name} batch: {case}")
    assert not pipe.images  # every embedding released


@pytest.mark.parametrize("name", VLM)
def test_prompt_ids_and_pixels_equal_transformers(pipes, name):
    """The two-image turn of the multi-turn case: images of different aspect ratios, both tiled."""
    ref_dir, pipe = pipes(name)
    messages = vlm_cases()["multi-turn"][:2] + [vlm_cases()["two images"][0]]
    reference = hf_inputs(ref_dir, messages)
    templated, sources = split_messages(messages)
    grids = [pipe.processor.image_grid(*image.size) for image in sources]
    assert all(pipe.processor.num_tiles(grid) > 2 for grid in grids[1:]), grids
    assert pipe.processor.encode_chat(templated, grids).input_ids == reference["input_ids"][0].tolist()
    pixels = np.concatenate([pipe.processor.preprocess(image, grid) for image, grid in zip(sources, grids)])
    assert torch.equal(torch.from_numpy(pixels), reference["pixel_values"])


@pytest.mark.parametrize("name", TEXT)
def test_text_only_models_match_transformers(pipes, name):
    model_dir, pipe = pipes(name)
    assert pipe.visual is None
    for case, messages in TEXT_CASES.items():
        check(pipe(messages, GenerationConfig(max_new_tokens=MAX_NEW)), model_dir, case, messages, f"{name}: {case}")
    responses = pipe(list(TEXT_CASES.values()), GenerationConfig(max_new_tokens=MAX_NEW))
    for (case, messages), response in zip(TEXT_CASES.items(), responses):
        check(response, model_dir, case, messages, f"{name} batch: {case}")


@pytest.mark.parametrize("name", TEXT)
def test_images_sent_to_a_text_only_model_are_refused(pipes, name):
    _, pipe = pipes(name)
    with pytest.raises(ValueError, match="takes no images"):
        pipe(vlm_cases()["one image"], GenerationConfig(max_new_tokens=4))
