"""The offline pipeline's interface: prompt forms, image sources, generation controls."""

import base64
import http.server
import json
import threading
from functools import partial
from pathlib import Path

import pytest

from lightvlm import GenerationConfig, pipeline
from lightvlm.common.grammar import GrammarError
from lightvlm.sampling_params import Constraint

from helpers import IMAGES, image_bytes, load_image

GREEDY = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def pipe(tiny_qwen2):
    return pipeline(tiny_qwen2, max_batch_size=8, session_len=1024, max_total_token_num=8 * 1024, data_type="fp32")


@pytest.fixture(scope="module")
def image_url():
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(IMAGES))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/coffee.jpg"
    httpd.shutdown()


def conversation(image_part):
    return [{"role": "user", "content": [image_part, {"type": "text", "text": "Describe this image."}]}]


def test_image_sources_agree(pipe, image_url):
    by_pil = pipe(("Describe this image.", load_image("coffee.jpg")), GREEDY)
    data_url = "data:image/jpeg;base64," + base64.b64encode(image_bytes("coffee.jpg")).decode()
    by_data_url = pipe(conversation({"type": "image_url", "image_url": {"url": data_url}}), GREEDY)
    by_http = pipe(conversation({"type": "image_url", "image_url": {"url": image_url}}), GREEDY)
    by_part = pipe(conversation({"type": "image", "image": load_image("coffee.jpg")}), GREEDY)
    assert by_pil.token_ids == by_data_url.token_ids == by_http.token_ids == by_part.token_ids
    assert by_pil.input_token_len > 100  # the image's rows are counted


def test_batch_of_mixed_prompt_forms_keeps_order(pipe):
    prompts = ["text only", ("two images", [load_image("coffee.jpg"), load_image("rocket.jpg")]),
               conversation({"type": "image", "image": load_image("chelsea.png")})]
    batch = pipe(prompts, GREEDY)
    alone = [pipe(p, GREEDY) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert batch[1].input_token_len > batch[2].input_token_len > batch[0].input_token_len


def test_response_fields(pipe):
    r = pipe("Hello!", GenerationConfig(max_new_tokens=5, ignore_eos=True))
    assert r.finish_reason == "length" and r.generate_token_len == len(r.token_ids) == 5
    assert r.text == pipe.processor.decode(r.token_ids)


def test_stop_words_cut_the_text(pipe):
    full = pipe("Tell me about the cat.", GenerationConfig(max_new_tokens=30, ignore_eos=True))
    stop = full.text[5:9]
    assert stop and stop in full.text
    cut = pipe("Tell me about the cat.", GenerationConfig(max_new_tokens=30, ignore_eos=True, stop_words=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]


def test_stop_token_ids_and_min_new_tokens(pipe):
    full = pipe("Tell me about the cat.", GenerationConfig(max_new_tokens=20, ignore_eos=True))
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    r = pipe("Tell me about the cat.", GenerationConfig(max_new_tokens=20, ignore_eos=True, stop_token_ids=[stop_id]))
    assert r.finish_reason == "stop" and r.token_ids == full.token_ids[:first + 1]
    eos = next(iter(pipe.eos_token_ids))
    forced = pipe("Tell me about the cat.", GenerationConfig(max_new_tokens=6, min_new_tokens=6))
    assert eos not in forced.token_ids[:-1] and len(forced.token_ids) == 6


def test_seed_reproduces_and_sampling_varies(pipe):
    config = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=123, ignore_eos=True)
    a, b = pipe("Once upon a time", config), pipe("Once upon a time", config)
    assert a.token_ids == b.token_ids
    other = pipe("Once upon a time", GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=7,
                                                       ignore_eos=True))
    assert other.token_ids != a.token_ids


def test_skip_special_tokens(pipe):
    r = pipe("Hi", GenerationConfig(max_new_tokens=40, skip_special_tokens=False, ignore_eos=True,
                                    stop_token_ids=[]))
    kept = pipe.processor.decode(r.token_ids, skip_special_tokens=False)
    assert r.text == kept


def test_prompt_longer_than_session_is_refused(pipe):
    with pytest.raises(ValueError, match="session_len is 1024"):
        pipe("word " * 1200)


def test_tensor_parallel_pipeline_gives_the_same_tokens(tiny_qwen2, pipe):
    prompts = [("Describe this image.", load_image("coffee.jpg")), "Text only, please.",
               ("Two images.", [load_image("chelsea.png"), load_image("coffee_strip_600x40.jpg")])]
    expected = [r.token_ids for r in pipe(prompts, GREEDY)]
    with pipeline(tiny_qwen2, tp=2, max_batch_size=8, session_len=1024, max_total_token_num=8 * 1024,
                  data_type="fp32") as split:
        # the workers are other processes: the image rows reached them through shared memory
        assert [r.token_ids for r in split(prompts, GREEDY)] == expected
        prefix = split.runner.prefix
        workers = [p for _, p in split.runner.rooms.children]
        assert len(workers) == 2 and all(p.is_alive() for p in workers)
    assert not list(Path("/dev/shm").glob(prefix + "*"))
    assert all(not p.is_alive() for p in workers)


def test_stop_string_on_the_last_allowed_token_is_a_stop(pipe):
    full = pipe("Tell me about the cat.", GenerationConfig(max_new_tokens=24, ignore_eos=True))
    tokenizer = pipe.processor.tokenizer
    for n in range(4, 24):  # a token whose text first appears right there
        piece = tokenizer.decode(full.token_ids[n])
        before = tokenizer.decode(full.token_ids[:n])
        if piece.strip() and piece not in before and before + piece == tokenizer.decode(full.token_ids[:n + 1]):
            break
    else:
        raise AssertionError("no token of the output is a usable stop string")
    r = pipe("Tell me about the cat.", GenerationConfig(max_new_tokens=n + 1, ignore_eos=True, stop_words=[piece]))
    assert r.finish_reason == "stop" and r.text == before and len(r.token_ids) == n + 1


def test_session_longer_than_the_model_is_refused(tiny_qwen2):
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        pipeline(tiny_qwen2, session_len=10**6, data_type="fp32")


def test_a_request_the_model_fails_on_ends_with_an_error(pipe, monkeypatch):
    """What the runner reports in StepOutput.failed ends that request (finish_reason "error") and only it."""
    real_run = pipe.runner._run
    doomed = pipe._next_id + 1  # the second request of the batch below

    def failing(step, check):
        if doomed in step.req_ids:
            raise RuntimeError("the model choked")
        return real_run(step, check)

    monkeypatch.setattr(pipe.runner, "_run", failing)
    good, bad = pipe(["Hello", "Hello again"], GREEDY)
    monkeypatch.undo()
    assert good.finish_reason != "error" and good.token_ids == pipe("Hello", GREEDY).token_ids
    assert bad.finish_reason == "error" and "the model choked" in bad.error and bad.token_ids == []


def test_structured_outputs_and_prompt_logprobs_in_the_pipeline(pipe):
    choices = ["red", "green", "blue"]
    config = GenerationConfig(max_new_tokens=20, constraint=Constraint("choice", json.dumps(choices)),
                              prompt_logprobs=1, logit_bias={5: -100.0})
    r = pipe(("Which color?", load_image("rocket.jpg")), gen_config=config)
    assert r.text in choices and r.finish_reason == "stop"  # ended by the grammar
    assert len(r.prompt_logprobs) == r.input_token_len and r.prompt_logprobs[0] is None
    assert sum(lp is None for lp in r.prompt_logprobs) > 16  # the image rows have no token to score
    with pytest.raises(GrammarError, match="Invalid type"):
        pipe("Hi", GenerationConfig(constraint=Constraint("json_schema", '{"type": "foo"}')))
