"""The offline pipeline gives transformers' greedy tokens on the same checkpoint and inputs: batching,
requests joining mid-decode, logits, generation_config defaults, penalties, the LM head, bf16.

Runs on checkpoints transformers wrote (test/references.py): InternVL with a Qwen2 backbone, and with a
Llama backbone of other head counts, GQA ratio, layer count and tile size. The plain cases (text, one
image, two images, multi-turn) in every checkpoint layout are in test_checkpoint_parity.py.
"""

import pytest
import torch

import lightvlm.engine.model_runner as model_runner
from lightvlm import GenerationConfig, pipeline

from helpers import load_image
from hf_reference import assert_same_greedy, hf_generate, hf_inputs, hf_messages, hf_model

MAX_NEW = 40


@pytest.fixture(scope="module", params=["hf-qwen2", "hf-llama"])
def model_dir(request, references):
    return references(request.param)


@pytest.fixture(scope="module")
def qwen2_dir(references):
    return references("hf-qwen2")


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.fixture
def pipe(model_dir, pipes):
    if model_dir not in pipes:
        pipes[model_dir] = pipeline(model_dir, max_batch_size=16, session_len=2048, max_total_token_num=16 * 2048,
                                    data_type="fp32")
    return pipes[model_dir]


def check(pipe, model_dir, text, images, max_new_tokens=MAX_NEW, response=None, label=""):
    reference, inputs = hf_generate(model_dir, hf_messages(text, images), max_new_tokens)
    if response is None:
        response = pipe((text, images) if images else text, GenerationConfig(max_new_tokens=max_new_tokens))
    assert response.input_token_len == inputs["input_ids"].shape[1]
    assert_same_greedy(model_dir, response.token_ids, reference, inputs, label or text)
    return response


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


def test_batch_of_eight_mixed_requests_matches_transformers(pipe, model_dir):
    requests = mixed_requests()
    responses = pipe([(t, ims) if ims else t for t, ims, _ in requests], GenerationConfig(max_new_tokens=64))
    assert len({r.input_token_len for r in responses}) > 4  # really different prompt lengths
    for (text, images, _), response in zip(requests, responses):
        check(pipe, model_dir, text, images, 64, response, label=f"batch: {text}")
    # different max_new_tokens in one batch: each request added with its own config
    ids = [pipe.add_request((t, ims) if ims else t, GenerationConfig(max_new_tokens=n)) for t, ims, n in requests]
    done = {}
    while len(done) < len(ids):
        done.update((r.index, r) for r in pipe.step())
    for (text, images, n), req_id in zip(requests, ids):
        assert done[req_id].generate_token_len <= n
        check(pipe, model_dir, text, images, n, done[req_id], label=f"max_new={n}: {text}")


def test_requests_joining_while_others_decode_match_transformers(pipe, model_dir):
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
        check(pipe, model_dir, text, images, 48, done[req_id], label=f"joined: {text}")
    pipe.scheduler.check_integrity()  # every slot free or in the prefix cache, none held by a request
    assert not pipe.scheduler.running and not pipe.scheduler.waiting
    assert not pipe.images  # every embedding released


def test_first_token_logits_match_transformers(pipe, model_dir, monkeypatch):
    captured = []
    real_sample = model_runner.sample

    def spy(logits, batch):
        captured.append(logits.clone())
        return real_sample(logits, batch)

    monkeypatch.setattr(model_runner, "sample", spy)
    images = [load_image("chelsea.png")]
    pipe(("Describe this image.", images), GenerationConfig(max_new_tokens=1))
    inputs = hf_inputs(model_dir, hf_messages("Describe this image.", images))
    with torch.no_grad():
        reference = hf_model(model_dir)(**inputs).logits[0, -1]
    assert captured[0].shape == (1, reference.shape[0])
    # fp32 on both sides, summed in different orders: differences of ~1e-6 on logits of magnitude ~3
    torch.testing.assert_close(captured[0][0], reference, atol=1e-4, rtol=0)


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


def test_generation_config_defaults_apply_as_in_transformers(qwen2_dir, tmp_path):
    """transformers' generate() applies generation_config.json's repetition_penalty even when greedy."""
    model_dir = variant(qwen2_dir, tmp_path, "penalized", edit_generation_config={"repetition_penalty": 1.5})
    images = [load_image("coffee.jpg")]
    reference, inputs = hf_generate(model_dir, hf_messages("Describe this image.", images), 40)
    plain, _ = hf_generate(qwen2_dir, hf_messages("Describe this image.", images), 40)
    assert reference != plain  # the penalty matters for this prompt
    ours = pipeline(model_dir, max_batch_size=4, session_len=1024, max_total_token_num=4096, data_type="fp32")
    r = ours(("Describe this image.", images), GenerationConfig(max_new_tokens=40))
    assert_same_greedy(model_dir, r.token_ids, reference, inputs, "generation_config repetition_penalty")


def test_repetition_penalty_counts_image_tokens_like_transformers(qwen2_dir):
    images = [load_image("chelsea.png")]
    inputs = hf_inputs(qwen2_dir, hf_messages("Describe this image.", images))
    with torch.no_grad():
        out = hf_model(qwen2_dir).generate(**inputs, max_new_tokens=30, do_sample=False, repetition_penalty=0.3)
    reference = out[0, inputs["input_ids"].shape[1]:].tolist()
    ours = pipeline(qwen2_dir, max_batch_size=4, session_len=1024, max_total_token_num=4096, data_type="fp32")
    r = ours(("Describe this image.", images), GenerationConfig(max_new_tokens=30, repetition_penalty=0.3))
    assert r.token_ids == reference


def test_separate_lm_head_in_a_tied_checkpoint_is_used(qwen2_dir, tmp_path):
    """The checkpoint says tie_word_embeddings but ships its own head: transformers uses the head."""
    def add_head(tensors):
        embed = tensors["language_model.model.embed_tokens.weight"]
        assert "language_model.lm_head.weight" not in tensors
        generator = torch.Generator().manual_seed(5)
        tensors["language_model.lm_head.weight"] = torch.randn(embed.shape, generator=generator) * 0.1

    model_dir = variant(qwen2_dir, tmp_path, "own-head", edit_tensors=add_head)
    reference, inputs = hf_generate(model_dir, hf_messages("Hello there!", []), 30)
    ours = pipeline(model_dir, max_batch_size=4, session_len=1024, max_total_token_num=4096, data_type="fp32")
    assert_same_greedy(model_dir, ours("Hello there!", GenerationConfig(max_new_tokens=30)).token_ids, reference,
                       inputs, "separate lm_head")


# bf16 keeps 8 significant bits: each rounding is worth up to 2^-9 of the value, and two correct bf16
# implementations round at different places (fused ops, GEMM blocking and AMX on some CPUs), so their
# logits differ by a few bf16 steps (the step is 1/64 for logits between 2 and 4; measured: at most 0.05
# on AMD EPYC, logits up to 3.3). The bound leaves twice that for other CPUs; a real bug (a wrong weight,
# position or mask) moves logits by tenths to units.
BF16_LOGIT_ATOL = 0.12


def test_bf16_agrees_with_transformers_in_bf16_step_by_step(references, monkeypatch):
    """Teacher-forced: our engine in bf16 is fed transformers' bf16 greedy ids one step at a time (the
    sampler returns transformers' token), so both score the same prefixes. At every step our logits are
    within BF16_LOGIT_ATOL of transformers' for that prefix, and our argmax is transformers' token
    wherever transformers' own top two are further apart than the two sides can differ."""
    from transformers import InternVLForConditionalGeneration

    model_dir = references("hf-llama")
    images = [load_image("coffee_strip_600x40.jpg")]
    inputs = hf_inputs(model_dir, hf_messages("What is this?", images))
    num_prompt = inputs["input_ids"].shape[1]
    model = InternVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    pixels = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model.generate(**{**inputs, "pixel_values": pixels}, max_new_tokens=30, do_sample=False)
        reference = out[0, num_prompt:].tolist()
        expected = model(input_ids=out, pixel_values=pixels).logits[0, num_prompt - 1:-1].float()  # [steps, V]

    captured, forced = [], iter(reference)

    def teacher(logits, batch):
        captured.append(logits[0].clone())
        return torch.tensor([next(forced)], device=logits.device), None, None

    monkeypatch.setattr(model_runner, "sample", teacher)
    ours = pipeline(model_dir, data_type="bf16", max_batch_size=4, session_len=1024, max_total_token_num=4096)
    r = ours(("What is this?", images), GenerationConfig(max_new_tokens=len(reference)))
    assert r.token_ids == reference and len(captured) == len(reference)
    logits = torch.stack(captured)
    torch.testing.assert_close(logits, expected, atol=BF16_LOGIT_ATOL, rtol=0)
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_LOGIT_ATOL
    assert clear.sum() >= 5  # steps where the argmax check below has force
    assert torch.equal(logits.argmax(-1)[clear], torch.tensor(reference)[clear])
