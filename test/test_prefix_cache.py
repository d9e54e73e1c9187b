"""The prefix cache in the offline pipeline: a chat's second turn computes only what is new, images
share KV only with equal images, and the answers stay transformers' greedy answers."""

import pytest

from lightvlm import GenerationConfig, pipeline

from helpers import load_image
from hf_reference import assert_same_greedy, hf_generate

MAX_NEW = 16
GREEDY = GenerationConfig(max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def model_dir(references):
    return references("hf-qwen2")


def make_pipe(model_dir, use_prefix_cache):
    return pipeline(model_dir, max_batch_size=8, session_len=2048, max_total_token_num=8 * 2048, data_type="fp32",
                    use_prefix_cache=use_prefix_cache)


@pytest.fixture(scope="module")
def cached(model_dir):
    return make_pipe(model_dir, True)


@pytest.fixture(scope="module")
def uncached(model_dir):
    return make_pipe(model_dir, False)


def user(text, image=None):
    return {"role": "user", "content": [*([{"type": "image", "image": image}] if image else []),
                                        {"type": "text", "text": text}]}


def computed(pipe, messages):
    before = pipe.runner.num_prompt_tokens_computed
    response = pipe(messages, GREEDY)
    return response, pipe.runner.num_prompt_tokens_computed - before


def image_span(pipe, response_prompt_len, messages):
    """(offset, rows) of the first image in the prompt the pipeline builds for messages."""
    req_id = pipe.add_request(messages, GenerationConfig(max_new_tokens=1))
    image = pipe._reqs[req_id].images[0]
    while req_id in pipe._reqs:
        pipe.step()
    return image.offset, image.num_rows


def test_second_turn_computes_only_the_new_tokens_and_matches_transformers(cached, model_dir):
    turn1 = [user("Describe this image.", load_image("coffee.jpg"))]
    first, _ = computed(cached, turn1)
    turn2 = [*turn1, {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
             user("What color is the cup?")]
    second, num_computed = computed(cached, turn2)
    assert second.cached_tokens >= first.input_token_len
    assert num_computed == second.input_token_len - second.cached_tokens
    reference, inputs = hf_generate(model_dir, turn2, MAX_NEW)
    assert second.input_token_len == inputs["input_ids"].shape[1]
    assert_same_greedy(model_dir, second.token_ids, reference, inputs, "turn 2")
    cached.scheduler.check_integrity()


def test_images_share_kv_only_with_equal_images(cached, model_dir):
    base = [user("What is in the picture?", load_image("rocket.jpg"))]
    offset, rows = image_span(cached, 0, base)
    other_image, _ = computed(cached, [user("What is in the picture?", load_image("chelsea.png"))])
    assert other_image.cached_tokens <= offset  # nothing past the image's first row
    question = [user("Is it day or night?", load_image("rocket.jpg"))]
    other_question, num_computed = computed(cached, question)
    assert other_question.cached_tokens >= offset + rows  # the whole image span
    assert num_computed == other_question.input_token_len - other_question.cached_tokens
    for messages, response in ((question, other_question),
                               ([user("What is in the picture?", load_image("chelsea.png"))], other_image)):
        reference, inputs = hf_generate(model_dir, messages, MAX_NEW)
        assert_same_greedy(model_dir, response.token_ids, reference, inputs, "image")
    cached.scheduler.check_integrity()


def test_cache_off_gives_identical_outputs_and_no_cached_tokens(cached, uncached):
    prompts = [[user(f"Tell me about the image, part {i}.", load_image("coffee.jpg"))] for i in range(4)]
    prompts += [[user("Tell me about the image, part 0.", load_image("coffee.jpg"))]]
    on = cached(prompts, GREEDY)
    off = uncached(prompts, GREEDY)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert all(r.cached_tokens == 0 for r in off)
    assert uncached.scheduler.kv is None
    again = cached(prompts[0], GREEDY)  # after it finished: all of the prompt but its last token is cached
    assert again.token_ids == on[0].token_ids and again.cached_tokens == again.input_token_len - 1
    cached.scheduler.check_integrity()
    uncached.scheduler.check_integrity()


def test_penalties_see_the_cached_part_of_the_prompt(cached, uncached):
    prompt = [user("Repeat: red red red blue blue.", load_image("chelsea.png"))]
    config = GenerationConfig(max_new_tokens=MAX_NEW, repetition_penalty=1.8)
    cached(prompt, GREEDY)  # puts the prompt in the cache
    with_cache = cached(prompt, config)
    assert with_cache.cached_tokens == with_cache.input_token_len - 1
    assert with_cache.token_ids == uncached(prompt, config).token_ids
    cached.scheduler.check_integrity()


def test_prompt_logprobs_compute_the_whole_prompt(cached, uncached):
    prompt = [user("Name the animal.", load_image("chelsea.png"))]
    cached(prompt, GREEDY)
    config = GenerationConfig(max_new_tokens=4, prompt_logprobs=1)
    before = cached.runner.num_prompt_tokens_computed
    with_cache = cached(prompt, config)
    assert with_cache.cached_tokens == 0
    assert cached.runner.num_prompt_tokens_computed - before == with_cache.input_token_len
    reference = uncached(prompt, config).prompt_logprobs
    assert len(with_cache.prompt_logprobs) == len(reference) and with_cache.prompt_logprobs[0] is None
    assert sum(p is not None for p in reference) > 10
    for ours, theirs in zip(with_cache.prompt_logprobs, reference):
        assert (ours is None) == (theirs is None)  # image rows have none
        if ours is not None:
            assert ours.token_id == theirs.token_id and abs(ours.logprob - theirs.logprob) < 1e-4
