"""The offline pipeline gives transformers' greedy tokens on the same checkpoint and inputs.

Runs on both tiny checkpoints (Qwen2 backbone; Llama backbone with other head counts, GQA ratio,
layer count and tile size).
"""

import pytest
import torch

import lightvlm.engine.model_runner as model_runner
from lightvlm import GenerationConfig, pipeline

from helpers import load_image
from hf_reference import assert_same_greedy, hf_generate, hf_inputs, hf_messages, hf_model

MAX_NEW = 40


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.fixture
def pipe(tiny_checkpoint, pipes):
    if tiny_checkpoint not in pipes:
        pipes[tiny_checkpoint] = pipeline(tiny_checkpoint, max_batch_size=16, session_len=2048,
                                          max_total_token_num=16 * 2048)
    return pipes[tiny_checkpoint]


def check(pipe, model_dir, text, images, max_new_tokens=MAX_NEW, response=None, label=""):
    reference, inputs = hf_generate(model_dir, hf_messages(text, images), max_new_tokens)
    if response is None:
        response = pipe((text, images) if images else text, GenerationConfig(max_new_tokens=max_new_tokens))
    assert response.input_token_len == inputs["input_ids"].shape[1]
    assert_same_greedy(model_dir, response.token_ids, reference, inputs, label or text)
    return response


def test_text_only_matches_transformers(pipe, tiny_checkpoint):
    r = check(pipe, tiny_checkpoint, "What is in this picture? Describe the cat in detail.", [])
    assert r.generate_token_len == len(r.token_ids) > 0


def test_one_image_matches_transformers(pipe, tiny_checkpoint):
    check(pipe, tiny_checkpoint, "Describe this image.", [load_image("coffee.jpg")])


def test_two_images_of_different_shapes_match_transformers(pipe, tiny_checkpoint):
    wide, square = load_image("coffee_strip_600x40.jpg"), load_image("camera_gray.png")
    assert pipe.processor.num_tiles(pipe.processor.image_grid(*wide.size)) > 2
    assert pipe.processor.num_tiles(pipe.processor.image_grid(*square.size)) > 2
    check(pipe, tiny_checkpoint, "What differs between these two pictures?", [wide, square])


def mixed_requests():
    names = ["coffee.jpg", "chelsea_rgba.png", "astronaut_10x10.png", "coffee_palette.png", "rocket.jpg"]
    texts = ["Hi.", "Describe this image in one sentence, please, with the colors and the shapes you see.",
             "What animal is shown in the photo?", "Count the objects.",
             "Where was this photo taken? Is it day or night?",
             "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "Read the text.", "A"]
    requests = []
    for i, text in enumerate(texts):
        images = [load_image(names[i % len(names)])] if i % 3 else []
        if i == 5:
            images = [load_image("coffee.webp"), load_image("chelsea.png")]
        requests.append((text, images, 8 + 7 * i))
    return requests


def test_batch_of_eight_mixed_requests_matches_transformers(pipe, tiny_checkpoint):
    requests = mixed_requests()
    responses = pipe([(t, ims) if ims else t for t, ims, _ in requests], GenerationConfig(max_new_tokens=64))
    assert len({r.input_token_len for r in responses}) > 4  # really different prompt lengths
    for (text, images, _), response in zip(requests, responses):
        check(pipe, tiny_checkpoint, text, images, 64, response, label=f"batch: {text}")
    # different max_new_tokens in one batch: each request added with its own config
    ids = [pipe.add_request((t, ims) if ims else t, GenerationConfig(max_new_tokens=n)) for t, ims, n in requests]
    done = {}
    while len(done) < len(ids):
        done.update((r.index, r) for r in pipe.step())
    for (text, images, n), req_id in zip(requests, ids):
        assert done[req_id].generate_token_len <= n
        check(pipe, tiny_checkpoint, text, images, n, done[req_id], label=f"max_new={n}: {text}")


def test_requests_joining_while_others_decode_match_transformers(pipe, tiny_checkpoint):
    requests = mixed_requests()
    config = GenerationConfig(max_new_tokens=48)
    ids, done = {}, {}
    for i, (text, images, _) in enumerate(requests):
        ids[pipe.add_request((text, images) if images else text, config)] = (text, images)
        for _ in range(3 + i):  # let the running ones decode a few steps before the next arrives
            done.update((r.index, r) for r in pipe.step())
    while len(done) < len(ids):
        done.update((r.index, r) for r in pipe.step())
    for req_id, (text, images) in ids.items():
        check(pipe, tiny_checkpoint, text, images, 48, done[req_id], label=f"joined: {text}")
    pipe.scheduler.allocator.check_integrity()
    assert pipe.scheduler.allocator.num_used == 0
    assert not pipe.images  # every embedding released


def test_first_token_logits_match_transformers(pipe, tiny_checkpoint, monkeypatch):
    captured = []
    real_sample = model_runner.sample

    def spy(logits, batch):
        captured.append(logits.clone())
        return real_sample(logits, batch)

    monkeypatch.setattr(model_runner, "sample", spy)
    images = [load_image("chelsea.png")]
    pipe(("Describe this image.", images), GenerationConfig(max_new_tokens=1))
    inputs = hf_inputs(tiny_checkpoint, hf_messages("Describe this image.", images))
    with torch.no_grad():
        reference = hf_model(tiny_checkpoint)(**inputs).logits[0, -1]
    assert captured[0].shape == (1, reference.shape[0])
    assert torch.allclose(captured[0][0], reference, atol=1e-4, rtol=0), (captured[0][0] - reference).abs().max()


def variant(model_dir, tmp_path, name, edit_generation_config=None, edit_tensors=None):
    """A copy of a checkpoint with its generation config or its tensors changed."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / name
    shutil.copytree(model_dir, out)
    if edit_generation_config:
        config = json.loads((out / "generation_config.json").read_text())
        config.update(edit_generation_config)
        (out / "generation_config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors")
    return out


def test_generation_config_defaults_apply_as_in_transformers(tiny_qwen2, tmp_path):
    """transformers' generate() applies generation_config.json's repetition_penalty even when greedy."""
    model_dir = variant(tiny_qwen2, tmp_path, "penalized", edit_generation_config={"repetition_penalty": 1.5})
    images = [load_image("coffee.jpg")]
    reference, inputs = hf_generate(model_dir, hf_messages("Describe this image.", images), 40)
    plain, _ = hf_generate(tiny_qwen2, hf_messages("Describe this image.", images), 40)
    assert reference != plain  # the penalty matters for this prompt
    ours = pipeline(model_dir, max_batch_size=4, session_len=1024, max_total_token_num=4096)
    r = ours(("Describe this image.", images), GenerationConfig(max_new_tokens=40))
    assert_same_greedy(model_dir, r.token_ids, reference, inputs, "generation_config repetition_penalty")


def test_repetition_penalty_counts_image_tokens_like_transformers(tiny_qwen2):
    images = [load_image("chelsea.png")]
    inputs = hf_inputs(tiny_qwen2, hf_messages("Describe this image.", images))
    with torch.no_grad():
        out = hf_model(tiny_qwen2).generate(**inputs, max_new_tokens=30, do_sample=False, repetition_penalty=0.3)
    reference = out[0, inputs["input_ids"].shape[1]:].tolist()
    ours = pipeline(tiny_qwen2, max_batch_size=4, session_len=1024, max_total_token_num=4096)
    r = ours(("Describe this image.", images), GenerationConfig(max_new_tokens=30, repetition_penalty=0.3))
    assert r.token_ids == reference


def test_separate_lm_head_in_a_tied_checkpoint_is_used(tiny_qwen2, tmp_path):
    """The checkpoint says tie_word_embeddings but ships its own head: transformers uses the head."""
    def add_head(tensors):
        embed = tensors["model.language_model.embed_tokens.weight"]
        tensors["lm_head.weight"] = torch.randn(embed.shape, generator=torch.Generator().manual_seed(5)) * 0.1

    model_dir = variant(tiny_qwen2, tmp_path, "own-head", edit_tensors=add_head)
    reference, inputs = hf_generate(model_dir, hf_messages("Hello there!", []), 30)
    ours = pipeline(model_dir, max_batch_size=4, session_len=1024, max_total_token_num=4096)
    assert_same_greedy(model_dir, ours("Hello there!", GenerationConfig(max_new_tokens=30)).token_ids, reference,
                       inputs, "separate lm_head")


def test_bf16_greedy_matches_transformers_in_bf16(tiny_llama):
    images = [load_image("coffee_strip_600x40.jpg")]
    inputs = hf_inputs(tiny_llama, hf_messages("What is this?", images))
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = model.generate(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)},
                             max_new_tokens=30, do_sample=False)
    reference = out[0, inputs["input_ids"].shape[1]:].tolist()
    ours = pipeline(tiny_llama, data_type="bf16", max_batch_size=4, session_len=1024, max_total_token_num=4096)
    r = ours(("What is this?", images), GenerationConfig(max_new_tokens=30))
    agree = next((i for i, (a, b) in enumerate(zip(r.token_ids, reference)) if a != b), len(reference))
    assert agree >= 20, f"bf16 ids part at step {agree}: {r.token_ids[:agree + 2]} vs {reference[:agree + 2]}"
