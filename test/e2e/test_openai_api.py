"""The OpenAI API with the real `openai` client against the real server."""

import base64
import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch

from lightvlm import GenerationConfig
from lightvlm.models.processor import split_messages

from helpers import grids, image_bytes, load_image
from hf_reference import hf_inputs, hf_model

MODEL = "tiny-qwen2"  # the served name: the checkpoint folder's name (a wrong one is a 404)


@pytest.fixture(scope="module")
def client(main_server):
    return openai.OpenAI(base_url=main_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(name):
    mime = "png" if name.endswith(".png") else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(image_bytes(name)).decode()


def image_chat(name="coffee.jpg", text="Describe this image."):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(name)}},
                                         {"type": "text", "text": text}]}]


def three_turns():
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Look at this:"},
                                     {"type": "image_url", "image_url": {"url": data_url("chelsea.png")}},
                                     {"type": "text", "text": "What animal is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What color is it?"},
        {"role": "assistant", "content": "Orange and white."},
        {"role": "user", "content": "Is it sleeping?"},
    ]


def to_hf_messages(messages):
    """The same messages for transformers' processor: image_url parts become PIL images."""
    names = {data_url(n): n for n in ("coffee.jpg", "chelsea.png", "rocket.jpg")}
    converted = []
    for m in messages:
        if isinstance(m["content"], str):
            converted.append(m)
            continue
        parts = [{"type": "image", "image": load_image(names[p["image_url"]["url"]])} if p["type"] == "image_url"
                 else p for p in m["content"]]
        converted.append({**m, "content": parts})
    return converted


def hf_prompt_ids(model_dir, messages) -> list[int]:
    return hf_inputs(model_dir, to_hf_messages(messages))["input_ids"][0].tolist()


def test_image_chat_stream_and_whole_agree_with_the_pipeline(client, tiny_pipe, tiny_qwen2):
    messages = image_chat()
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    expected = tiny_pipe(messages, GenerationConfig(max_new_tokens=24))
    assert whole.choices[0].message.content == expected.text
    assert whole.usage.completion_tokens == len(expected.token_ids)


def test_prompt_tokens_equal_transformers_processor_ids(client, tiny_qwen2):
    for messages in (image_chat(), three_turns(), [{"role": "user", "content": "Just text."}]):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=2)
        assert r.usage.prompt_tokens == len(hf_prompt_ids(tiny_qwen2, messages))


def test_three_turns_with_an_image_in_the_first(client, tiny_pipe, tiny_qwen2):
    r = client.chat.completions.create(model=MODEL, messages=three_turns(), temperature=0, max_tokens=16)
    expected = tiny_pipe(three_turns(), GenerationConfig(max_new_tokens=16))
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == expected.input_token_len
    # the ids the engine built are transformers' ids: the image sits inside the first user turn
    templated, sources = split_messages(three_turns())
    ids = tiny_pipe.processor.encode_chat(templated, grids(tiny_pipe.processor, [load_image("chelsea.png")])).input_ids
    assert ids == hf_prompt_ids(tiny_qwen2, three_turns())
    start = ids.index(tiny_pipe.processor.start_id)
    tokenizer = tiny_pipe.processor.tokenizer
    assert tokenizer.decode(ids[:start]).endswith("Look at this:")
    after = tokenizer.decode(ids[ids.index(tiny_pipe.processor.end_id) + 1:])
    assert after.startswith("\nWhat animal is it?")  # the template puts a newline after each image


def test_seed_reproduces_and_differs_between_seeds(client):
    def sample(seed):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                           temperature=1.2, max_tokens=20, seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)
    alone = sample(11)
    with ThreadPoolExecutor(8) as pool:  # the same request inside a busy batch of other sampled requests
        others = [pool.submit(sample, None) for _ in range(6)]
        busy = pool.submit(sample, 11)
        assert busy.result() == alone
        assert len({o.result() for o in others}) > 1


def test_stop_cuts_before_the_stop_string_in_both_modes(client):
    messages = [{"role": "user", "content": "Describe the cat on the table."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[6:10]
    assert stop.strip(), full
    cut = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == full[:full.index(stop)]
    shown = ""
    for piece in pieces:
        shown += piece
        assert stop not in shown


def test_max_tokens_and_max_completion_tokens(client):
    messages = [{"role": "user", "content": "Count to one hundred."}]
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **{field: 7},
                                           extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    both = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20,
                                          max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 5


def test_default_max_tokens_runs_to_the_context_limit(client, main_server):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on."}], temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == 2048  # --max_req_total_len of the main server


def test_n_returns_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=8,
                                       temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                              max_tokens=8, temperature=1.0, seed=3, stream=True)
    texts = {}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {c.index: c.message.content for c in r.choices}


def test_logprobs_are_the_log_softmax_of_the_models_logits(client, tiny_pipe, tiny_qwen2):
    messages = image_chat("rocket.jpg")
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=3)
    served = r.choices[0].logprobs.content
    offline = tiny_pipe(messages, GenerationConfig(max_new_tokens=8, logprobs=True, top_logprobs=3))
    # Both fp32, on one CPU, but in processes with other thread counts (so other GEMM blockings): the same
    # values up to summation order, ~1e-6 on logprobs of magnitude ~5; 1e-4 leaves room for other CPUs.
    assert len(served) == len(offline.logprobs)
    for ours_served, ours_offline in zip(served, offline.logprobs):
        assert math.isclose(ours_served.logprob, ours_offline.logprob, rel_tol=0, abs_tol=1e-4)
    # the top-1 alternative of a greedy step is the chosen token: one number, reported twice
    assert all(len(t.top_logprobs) == 3 and math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-6)
               for t in served)
    # the pipeline's logprobs against transformers' log-softmax for the same tokens
    inputs = hf_inputs(tiny_qwen2, [{"role": "user", "content": [{"type": "image", "image": load_image("rocket.jpg")},
                                                                 {"type": "text", "text": "Describe this image."}]}])
    ids = torch.cat([inputs["input_ids"], torch.tensor([offline.token_ids])], dim=1)
    with torch.no_grad():
        logits = hf_model(tiny_qwen2)(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    n = len(offline.token_ids)
    reference = logits[-n - 1:-1].log_softmax(-1).gather(1, torch.tensor(offline.token_ids)[:, None]).squeeze(1)
    # fp32 against transformers' fp32: summation order only (see above)
    torch.testing.assert_close(torch.tensor([t.logprob for t in offline.logprobs]), reference, atol=1e-4, rtol=0)


def test_top_k_1_equals_greedy(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    greedy = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    top1 = client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, max_tokens=16,
                                          extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


def test_unknown_fields_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       user="someone", extra_body={"made_up_option": {"x": 1}, "guided_json": None})
    assert r.choices[0].message.role == "assistant"


def test_bad_image_url_is_400_and_the_server_stays_healthy(client, main_server):
    for url in ("data:image/png;base64,###", "http://127.0.0.1:9/none.png", "ftp://127.0.0.1/x.png"):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]}])
        assert error.value.status_code == 400 and error.value.body["message"]
    assert main_server.get("/health").status_code == 200
    assert client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3).choices


def test_body_over_the_limit_is_413_in_openai_shape(main_server):
    response = requests.post(main_server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x" * (4 * 2**20)}]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413 and "--max_body_size" in response.json()["error"]["message"]


def test_bad_values_get_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages="not a list")


def test_completions_endpoint(client, tiny_pipe):
    prompt = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=2, echo=True)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], temperature=0,
                                          max_tokens=10)
    assert r.choices[0].text == prompt + chat.choices[0].message.content
    logprobs = r.choices[0].logprobs.token_logprobs  # with echo: the prompt's tokens first, the first one null
    assert len(logprobs) == r.usage.prompt_tokens + r.usage.completion_tokens and logprobs[0] is None
    ids = tiny_pipe.processor.tokenizer(prompt)["input_ids"]
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Another one"], max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert len(batch.choices) == 2 and batch.choices[0].text == chat.choices[0].message.content[:len(
        batch.choices[0].text)]
    assert by_ids.choices[0].text == chat.choices[0].message.content
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert streamed == chat.choices[0].message.content


def test_min_tokens_without_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                       extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens >= 5


def test_tools_without_a_parser_name_the_flag_and_a_wrong_model_is_404(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError, match="--tool_call_parser"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], tools=tools)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist."):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          model=MODEL).choices
