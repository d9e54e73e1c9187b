"""Structured outputs, tool calls, logit_bias and prompt logprobs through the real `openai` client against
the real server, on a tiny checkpoint with Qwen2.5's tools template (random weights: a tool call is
forced with tool_choice, through the grammar)."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from conftest import start, stop_and_check
from helpers import image_bytes
from hf_reference import hf_model
from server import wait_for

MODEL = "tiny-qwen2-tools"


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    member: bool
    role: Literal["admin", "viewer", "guest"]


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema(),
                                                 "strict": True}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": {**Weather.model_json_schema(),
                                                          "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                           "parameters": {"type": "object", "properties": {},
                                                          "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qwen2_tools):
    server = start(tmp_path_factory, "structured", tiny_qwen2_tools, "--enable_multimodal", "--tool_call_parser",
                   "hermes", "--max_req_total_len", "1024", "--max_total_token_num", "60000",
                   "--running_max_req_size", "48", env={"LIGHTVLM_FAULT_STEP_TOKEN": "99"})
    yield server
    stop_and_check(server)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def image_messages(text: str, name: str = "coffee.jpg") -> list[dict]:
    url = "data:image/jpeg;base64," + base64.b64encode(image_bytes(name)).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def streamed_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_json_schema_holds_for_20_seeds_with_an_image_streamed_and_not(client):
    messages = image_messages("Who is in the picture? Answer as JSON.")

    def ask(seed: int, stream: bool) -> str:
        kwargs = dict(model=MODEL, messages=messages, temperature=1.0, seed=seed, max_tokens=200,
                      response_format=PERSON)
        if stream:
            return streamed_text(client.chat.completions.create(stream=True, **kwargs))
        answer = client.chat.completions.create(**kwargs).choices[0]
        assert answer.finish_reason == "stop"  # the grammar ended it
        return answer.message.content

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda args: ask(*args), [(seed, stream) for seed in range(20) for stream in (0, 1)]))
    for text in texts:
        Person.model_validate_json(text)
    assert texts[0::2] == texts[1::2]  # the same seed gives the same document, streamed or not
    assert len(set(texts[0::2])) >= 15


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A person?"}],
                                               response_format=Person, max_tokens=200, temperature=0.8, seed=1)
    assert isinstance(completion.choices[0].message.parsed, Person)


def test_n_choices_each_follow_the_schema(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "People?"}], n=3,
                                       temperature=1.0, seed=4, max_tokens=200, response_format=PERSON)
    assert len({Person.model_validate_json(c.message.content).model_dump_json() for c in r.choices}) == 3


def collect_tool_stream(chunks) -> tuple[list[dict], str]:
    calls, reason = {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or call.id
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
    return [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_streamed_and_not(client, tool_choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=150,
                  temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    if call.function.name == "get_weather":
        Weather.model_validate_json(call.function.arguments)
    else:
        assert json.loads(call.function.arguments) == {}
    streamed, reason = collect_tool_stream(client.chat.completions.create(stream=True, **kwargs))
    assert reason == "tool_calls" and len(streamed) == 1 and streamed[0]["id"].startswith("call_")
    assert streamed[0]["name"] == call.function.name
    assert json.loads(streamed[0]["arguments"]) == json.loads(call.function.arguments)
    bare = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert whole.usage.prompt_tokens > bare.usage.prompt_tokens + 50  # the template wrote the tools


def test_a_tool_call_history_goes_back_through_the_template(client):
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 20 C"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_requests_without_constraints_are_untouched_by_constrained_neighbours(client):
    plain = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=40,
                 extra_body={"ignore_eos": True})
    alone = client.chat.completions.create(temperature=0, **plain).choices[0].message.content
    sampled = client.chat.completions.create(temperature=1.0, seed=3, **plain).choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(client.chat.completions.create, model=MODEL, temperature=1.0, seed=s,
                                   messages=[{"role": "user", "content": "JSON"}], max_tokens=200,
                                   response_format=PERSON) for s in range(4)]
        busy = pool.submit(client.chat.completions.create, temperature=0, **plain)
        busy_sampled = pool.submit(client.chat.completions.create, temperature=1.0, seed=3, **plain)
        assert busy.result().choices[0].message.content == alone
        assert busy_sampled.result().choices[0].message.content == sampled
        for future in constrained:
            Person.model_validate_json(future.result().choices[0].message.content)


def test_logit_bias_plus_100_forces_a_token_and_minus_100_removes_it(client, server, tiny_qwen2_tools):
    prompt = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True})
    forced = client.completions.create(logit_bias={"77": 100}, **kwargs)
    token = server.post("/detokenize", {"tokens": [77]}).json()["prompt"]
    assert forced.choices[0].logprobs.tokens == [token] * 12
    free = client.completions.create(**kwargs).choices[0].logprobs.tokens
    first = server.post("/tokenize", {"prompt": free[0], "add_special_tokens": False}).json()["tokens"]
    assert len(first) == 1
    removed = client.completions.create(logit_bias={str(first[0]): -100}, **kwargs).choices[0].logprobs.tokens
    assert free[0] not in removed and removed != free


def test_echo_logprobs_with_max_tokens_0_equal_transformers(client, tiny_qwen2_tools):
    prompt = "<|im_start|>user\nHello there, how are you today?<|im_end|>\n"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == prompt and r.usage.completion_tokens == 0 and choice.finish_reason == "length"
    tokenizer_ids = prompt_ids(tiny_qwen2_tools, prompt)
    values = choice.logprobs.token_logprobs
    assert len(values) == len(tokenizer_ids) == r.usage.prompt_tokens and values[0] is None
    with torch.no_grad():
        logits = hf_model(tiny_qwen2_tools)(input_ids=torch.tensor([tokenizer_ids])).logits[0, :-1]
    expected = logits.log_softmax(-1).gather(1, torch.tensor(tokenizer_ids[1:])[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(values[1:]), expected, atol=1e-4)
    tops = choice.logprobs.top_logprobs[1:]  # keyed by text: alternatives that decode alike share a key
    assert all(1 <= len(top) <= 2 and max(top.values()) >= value - 1e-6 for top, value in zip(tops, values[1:]))
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt
    assert streamed[0].choices[0].logprobs.token_logprobs == values


def prompt_ids(model_dir, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(prompt)["input_ids"]


# -- validation as vLLM does it ----------------------------------------------------------------------

@pytest.mark.parametrize("fields, status, message", [
    ({"model": "no-such-model"}, 404, "The model `no-such-model` does not exist."),
    ({"stream_options": {"include_usage": True}}, 400, "Stream options can only be defined when `stream=True`"),
    ({"response_format": {"type": "yaml"}}, 400, "'response_format.type'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, 400,
     "invalid json_schema: Invalid type: foo"),
    ({"logit_bias": {"99999": 5}}, 400, "logit_bias has token ids outside the vocabulary"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"top_logprobs": 21, "logprobs": True}, 400, "'top_logprobs'"),
    ({"n": 0}, 400, "n must be between"),
    ({"temperature": "hot"}, 400, "'temperature'"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, 400, "at most one output constraint"),
    ({"guided_regex": "(a"}, 400, "unclosed group"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "'nope'"),
    ({"tool_choice": "required"}, 400, "'tool_choice' needs 'tools'"),
    ({"functions": [{"name": "f"}]}, 400, "send `tools`"),
    ({"modalities": ["text", "audio"]}, 400, "'modalities'"),
    ({"use_beam_search": True}, 400, "beam search"),
])
def test_bad_fields_are_refused_naming_the_field(server, fields, status, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **fields}
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_completions_validation(server):
    def post(**fields):
        return server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, **fields})

    assert "suffix" in post(suffix="!").json()["error"]["message"]
    assert "max_tokens" in post(max_tokens=0).json()["error"]["message"]  # 0 only with echo
    assert post(logprobs=21).status_code == 400
    assert "best_of" in post(best_of=3).json()["error"]["message"]
    assert post(best_of=1, user="someone", metadata={"a": "b"}).status_code == 200  # ignored, as vLLM does


def test_unknown_fields_are_ignored_and_logged_once_per_name(server):
    for _ in range(3):
        response = server.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "made_up_knob_xyz": 1,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 200
    assert server.output().count("'made_up_knob_xyz'") == 1


# -- the native API's structured outputs ---------------------------------------------------------------

def generate(server, **parameters):
    body = {"inputs": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 120, **parameters}}
    return server.post("/generate", body)


def test_native_structured_outputs(server):
    schema = Weather.model_json_schema() | {"additionalProperties": False}
    Weather.model_validate_json(generate(server, guided_json=schema, do_sample=True, seed=2).json()
                                ["generated_text"][0])
    out = generate(server, regular_constraint=r"\d{3}-[a-c]{2}").json()
    assert out["finish_reason"] == "stop" and len(out["generated_text"][0]) == 6
    assert generate(server, guided_grammar='root ::= "yes" | "no"').json()["generated_text"][0] in ("yes", "no")
    tokens = generate(server, max_new_tokens=6, allowed_token_ids=[30, 31], return_details=True).json()["tokens"]
    assert {t["id"] for t in tokens} <= {30, 31}
    assert generate(server, guided_json="{not json").status_code == 400
    both = generate(server, guided_json=schema, regular_constraint="a")
    assert both.status_code == 400 and "at most one" in both.json()["message"]


def test_native_return_details_has_the_prompt_logprobs(server, tiny_qwen2_tools):
    out = generate(server, max_new_tokens=2, return_details=True).json()
    prompt = out["prompt_token_logprobs"]
    ids = [t["id"] for t in prompt]
    assert len(prompt) == out["prompt_tokens"] and prompt[0]["logprob"] is None
    with torch.no_grad():
        logits = hf_model(tiny_qwen2_tools)(input_ids=torch.tensor([ids])).logits[0, :-1]
    expected = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor([t["logprob"] for t in prompt[1:]]), expected, atol=1e-4)


# -- vLLM's small endpoints ------------------------------------------------------------------------------

def test_tokenize_counts_images_and_detokenize_inverts_it(server, client):
    messages = image_messages("What is this?")
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    tokens = server.post("/tokenize", {"model": MODEL, "messages": messages}).json()
    assert tokens["count"] == len(tokens["tokens"]) == chat.usage.prompt_tokens
    assert tokens["max_model_len"] == 1024
    text = server.post("/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    assert server.post("/detokenize", {"tokens": text["tokens"]}).json() == {"prompt": "hello world"}
    assert len(text["token_strs"]) == text["count"]
    assert server.post("/detokenize", {"tokens": [10**6]}).status_code == 400
    assert server.post("/tokenize", {"model": "other", "prompt": "x"}).status_code == 404
    assert server.get("/version").json()["version"]


# -- metrics ------------------------------------------------------------------------------------------

def read_metrics(server) -> tuple[dict, dict]:
    families = list(text_string_to_metric_families(server.get("/metrics").text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return samples, {f.name: f for f in families}


def grew(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def metrics_once(server, since: dict, growth: float, name: str, **labels) -> dict:
    """The metrics once `name` grew by `growth` since `since` (or after 10 s, for the asserts to show)."""
    def ready():
        samples = read_metrics(server)[0]
        return samples if grew(since, samples, name, **labels) == growth else None

    return wait_for(ready, timeout=10) or read_metrics(server)[0]


def native_body(**parameters) -> dict:
    return {"inputs": "<|im_start|>user\nCount<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"ignore_eos": True, **parameters}}


def test_metrics_count_normal_aborted_and_failed_requests(server):
    model = {"model_name": MODEL}
    before, _ = read_metrics(server)
    done = [server.post("/generate", native_body(max_new_tokens=n)).json() for n in (3, 5)]
    with requests.post(server.url + "/generate_stream", json=native_body(max_new_tokens=4), stream=True,
                       timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith(b"data:")]
    assert len(events) == 4
    after = metrics_once(server, before, 3, "vllm:e2e_request_latency_seconds_count", **model)
    assert grew(before, after, "lightvlm_requests_total", status="length") == 3
    assert grew(before, after, "vllm:request_success_total", finished_reason="length", **model) == 3
    assert grew(before, after, "vllm:generation_tokens_total", **model) == 3 + 5 + 4
    assert grew(before, after, "vllm:prompt_tokens_total", **model) == 3 * done[0]["prompt_tokens"]
    assert grew(before, after, "vllm:time_to_first_token_seconds_count", **model) == 3
    assert grew(before, after, "vllm:inter_token_latency_seconds_count", **model) == 2 + 4 + 3
    assert grew(before, after, "lightvlm_requests_total", status="abort") == 0  # a finished stream is no abort

    with requests.post(server.url + "/generate_stream", json=native_body(max_new_tokens=300), stream=True,
                       timeout=60) as response:
        next(line for line in response.iter_lines() if line)  # one event, then the client goes away
    failed = server.post("/generate", {"inputs": [99, 1, 2, 3], "parameters": {"max_new_tokens": 12}})
    assert failed.status_code == 500  # the fault injected into the model step
    final = metrics_once(server, after, 1, "lightvlm_requests_total", status="abort")
    assert grew(after, final, "lightvlm_requests_total", status="error_500") == 1
    assert grew(after, final, "lightvlm_requests_total", status="length") == 0
    time.sleep(0.3)  # the rooms report about ten times a second
    samples, families = read_metrics(server)
    assert families["lightvlm_kv_slots_total"].type == "gauge"  # a capacity, not a count
    assert families["vllm:num_preemptions"].type == "counter"
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge" and families[name].samples[0].labels == model
    for name in ("vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_queue_time_seconds", "vllm:e2e_request_latency_seconds"):
        assert families[name].type == "histogram"
    assert samples[("vllm:request_prefill_time_seconds_count", (("model_name", MODEL),))] >= 3
    assert samples[("vllm:kv_cache_usage_perc", (("model_name", MODEL),))] == 0
    assert ("process_cpu_seconds_total", ()) in samples
