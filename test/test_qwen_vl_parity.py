"""The offline pipeline gives transformers' greedy tokens on Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints
that transformers itself wrote (test/qwen_vl_references.py), one per model of the line."""

import pytest
import torch

import lightvlm.engine.model_runner as model_runner
from lightvlm import GenerationConfig, pipeline
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.layers.positions import TablePositions
from lightvlm.models.qwen_vl.model import QwenVLLanguage

from helpers import load_image
from qwen_vl_references import assert_same_greedy, hf_generate, hf_inputs, hf_model, messages

MAX_NEW = 24


@pytest.fixture(scope="module")
def pipes():
    made = {}
    yield made
    for pipe in made.values():
        pipe.close()


@pytest.fixture
def pipe(qwen_vl_reference, pipes):
    if qwen_vl_reference not in pipes:
        pipes[qwen_vl_reference] = pipeline(qwen_vl_reference, max_batch_size=8, session_len=1024,
                                            max_total_token_num=8 * 1024, batch_max_tokens=96, data_type="fp32")
    return pipes[qwen_vl_reference]


def multi_turn():
    """An image in turn one, text turns after it."""
    return [{"role": "user", "content": [{"type": "image", "image": load_image("chelsea.png")},
                                         {"type": "text", "text": "What animal is this?"}]},
            {"role": "assistant", "content": "A cat, sitting."},
            {"role": "user", "content": "And what color is it? Answer with care."}]


def cases():
    """(label, conversation) for text only, one image, two images of other sizes and aspect ratios in
    one message, and a multi-turn conversation with an image in turn one."""
    return [("text only", messages("Tell me a story about a dog.", [])),
            ("one image", messages("Describe this image.", [load_image("coffee.jpg")])),
            ("two images", messages("What differs between them?", [load_image("coffee_strip_600x40.jpg"),
                                                                       load_image("camera_gray.png")])),
            ("multi-turn", multi_turn())]


def check(model_dir, conversation, response, label, max_new_tokens=MAX_NEW):
    reference, inputs = hf_generate(model_dir, conversation, max_new_tokens)
    assert response.input_token_len == inputs["input_ids"].shape[1], label
    assert_same_greedy(model_dir, response.token_ids, reference, inputs, label)


def test_each_kind_of_prompt_matches_transformers(pipe, qwen_vl_reference):
    for label, conversation in cases():
        response = pipe(conversation, GenerationConfig(max_new_tokens=MAX_NEW))
        assert len(set(response.token_ids)) > 3, f"{label}: degenerate output {response.token_ids}"
        check(qwen_vl_reference, conversation, response, label)


def test_a_batch_of_all_of_them_matches_transformers(pipe, qwen_vl_reference):
    conversations = [c for _, c in cases()] * 2
    responses = pipe(conversations, GenerationConfig(max_new_tokens=MAX_NEW))
    for (label, _), conversation, response in zip(cases() * 2, conversations, responses):
        check(qwen_vl_reference, conversation, response, f"batch: {label}")


def test_requests_joining_a_running_batch_match_transformers(pipe, qwen_vl_reference):
    """Each request arrives while the ones before it decode; prompts longer than batch_max_tokens are
    prefilled in chunks that cut through images."""
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    ids, done = {}, {}
    for i, (label, conversation) in enumerate(cases()):
        ids[pipe.add_request(conversation, config)] = (label, conversation)
        for _ in range(2 + i):
            done.update((r.index, r) for r in pipe.step())
    while len(done) < len(ids):
        done.update((r.index, r) for r in pipe.step())
    for req_id, (label, conversation) in ids.items():
        check(qwen_vl_reference, conversation, done[req_id], f"joined: {label}")
    pipe.scheduler.check_integrity()  # every slot free or in the prefix cache, none held by a request
    assert not pipe.scheduler.running and not pipe.images


def test_first_step_logits_match_transformers(pipe, qwen_vl_reference, monkeypatch):
    captured = []
    real_sample = model_runner.sample
    monkeypatch.setattr(model_runner, "sample", lambda logits, batch: captured.append(logits.clone()) or
                        real_sample(logits, batch))
    for _, conversation in cases():
        captured.clear()
        pipe(conversation, GenerationConfig(max_new_tokens=1))
        with torch.no_grad():
            reference = hf_model(qwen_vl_reference)(**hf_inputs(qwen_vl_reference, conversation)).logits[0, -1]
        assert captured[0].shape == (1, reference.shape[0])
        assert torch.allclose(captured[0][0], reference, atol=1e-4, rtol=0), (captured[0][0] - reference).abs().max()


def test_one_dimensional_positions_change_the_answer(pipe, qwen_vl_reference, monkeypatch):
    """M-RoPE matters: with an image in the middle of the text, the 1-D positions LightLLM once fed
    Qwen2-VL give other tokens than transformers (which ours match)."""
    conversation = [{"role": "user", "content": [
        {"type": "text", "text": "Look at this picture"}, {"type": "image", "image": load_image("rocket.jpg")},
        {"type": "text", "text": "and tell me what you see in it, in detail."}]}]
    right = pipe(conversation, GenerationConfig(max_new_tokens=MAX_NEW))
    check(qwen_vl_reference, conversation, right, "image mid-text")
    monkeypatch.setattr(QwenVLLanguage, "plan_positions",
                        lambda self, n, images: TablePositions(torch.arange(n).expand(3, -1), n))
    wrong = pipeline(qwen_vl_reference, max_batch_size=2, session_len=1024, max_total_token_num=2048, data_type="fp32")
    assert wrong(conversation, GenerationConfig(max_new_tokens=MAX_NEW)).token_ids != right.token_ids


def test_tensor_parallel_pipeline_matches_transformers(qwen_vl_reference):
    """--tp 2: the language model split over two worker processes (gloo)."""
    with pipeline(qwen_vl_reference, tp=2, max_batch_size=4, session_len=1024, max_total_token_num=4096,
                  data_type="fp32") as tp2:
        conversations = [c for _, c in cases()]
        responses = tp2(conversations, GenerationConfig(max_new_tokens=MAX_NEW))
    for (label, conversation), response in zip(cases(), responses):
        check(qwen_vl_reference, conversation, response, f"tp2: {label}")


def test_lower_max_pixels_for_the_pipeline_matches_transformers(qwen_vl_reference):
    checkpoint = LoadedCheckpoint.open(qwen_vl_reference).processor
    factor = checkpoint.patch_size * checkpoint.merge_size
    ours = pipeline(qwen_vl_reference, max_batch_size=2, session_len=1024, max_total_token_num=2048,
                    max_pixels=factor * factor * 12, data_type="fp32")
    conversation = messages("Describe this image.", [load_image("coffee.jpg")])
    response = ours(conversation, GenerationConfig(max_new_tokens=MAX_NEW))
    reference, inputs = hf_generate(qwen_vl_reference, conversation, MAX_NEW, max_pixels=factor * factor * 12)
    assert response.input_token_len == inputs["input_ids"].shape[1] < hf_inputs(
        qwen_vl_reference, conversation)["input_ids"].shape[1]
    assert_same_greedy(qwen_vl_reference, response.token_ids, reference, inputs, "server-wide max_pixels")
