"""The native API on the real server: the same tokens as the offline pipeline, streams that add up,
LightLLM's own multimodal example, and the small endpoints."""

import base64
import json

import requests

from lightvlm import GenerationConfig

from helpers import grids, image_bytes, load_image

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


def native_prompt(pipe, messages=MESSAGES, placeholder="<img></img>"):
    """The chat-templated prompt, with the LightLLM placeholder where the image goes."""
    return pipe.processor.apply_chat_template(messages).replace("<IMG_CONTEXT>", placeholder)


def b64(name):
    return base64.b64encode(image_bytes(name)).decode()


def generate_body(prompt, images, **parameters):
    return {"inputs": prompt, "parameters": {"max_new_tokens": 24, "min_new_tokens": 0, "return_details": True,
                                             **parameters},
            "multimodal_params": {"images": images}}


def pipeline_tokens(pipe, name, max_new_tokens=24):
    return pipe(("Describe this image.", load_image(name)), GenerationConfig(max_new_tokens=max_new_tokens)).token_ids


def test_base64_image_gives_the_pipelines_tokens(main_server, tiny_pipe):
    body = generate_body(native_prompt(tiny_pipe), [{"type": "base64", "data": b64("rocket.jpg")}])
    response = main_server.post("/generate", body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert [t["id"] for t in out["tokens"]] == pipeline_tokens(tiny_pipe, "rocket.jpg")
    assert isinstance(out["generated_text"], list) and out["count_output_tokens"] == len(out["tokens"])
    processor = tiny_pipe.processor
    expected_prompt = processor.encode_chat(MESSAGES, grids(processor, [load_image("rocket.jpg")])).input_ids
    assert out["prompt_tokens"] == len(expected_prompt)


def test_url_image_gives_the_pipelines_tokens(main_server, tiny_pipe, image_server):
    body = generate_body(native_prompt(tiny_pipe, placeholder="<image>"),
                         [{"type": "url", "data": f"{image_server}/chelsea.png"}])
    response = main_server.post("/generate", body)
    assert response.status_code == 200, response.text
    assert [t["id"] for t in response.json()["tokens"]] == pipeline_tokens(tiny_pipe, "chelsea.png")


def read_events(response):
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            events.append(json.loads(line[5:]))
    return events


def test_stream_events_add_up_to_the_same_text(main_server, tiny_pipe):
    body = generate_body(native_prompt(tiny_pipe), [{"type": "base64", "data": b64("coffee.jpg")}])
    whole = main_server.post("/generate", body).json()
    with requests.post(main_server.url + "/generate_stream", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = read_events(response)
    assert events[-1]["finished"] is True and events[-1]["finish_reason"] == whole["finish_reason"]
    assert all(not e["finished"] for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"][0]
    assert events[-1]["generated_text"] == whole["generated_text"][0]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["tokens"]]
    assert [e["token"]["count_output_tokens"] for e in events] == list(range(1, len(events) + 1))


def test_lightllm_multimodal_example_works_as_written(main_server, tiny_pipe):
    query = """
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
<img></img>
这是什么？<|im_end|>
<|im_start|>assistant
"""
    data = {
        "inputs": query,
        "parameters": {
            "max_new_tokens": 200,
            # The space before <|endoftext|> is important (LightLLM's comment): these name stop tokens.
            "stop_sequences": [" <|endoftext|>", " <|im_start|>", " <|im_end|>"],
        },
        "multimodal_params": {"images": [{"type": "base64", "data": b64("astronaut.jpg")}]},
    }
    response = requests.post(main_server.url + "/generate", headers={"Content-Type": "application/json"},
                             data=json.dumps(data), timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["finish_reason"] in ("stop", "length")
    # the same request through the pipeline, with the stop tokens as stop ids
    tokenizer = tiny_pipe.processor.tokenizer
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    prompt = tiny_pipe.processor.encode(query.replace("<img></img>", "<IMG_CONTEXT>"),
                                        grids(tiny_pipe.processor, [load_image("astronaut.jpg")]))
    details = main_server.post("/generate", {**data, "parameters": {**data["parameters"], "return_details": True}})
    ids = [t["id"] for t in details.json()["tokens"]]
    assert len(ids) == result["count_output_tokens"] and len(prompt.input_ids) == result["prompt_tokens"]
    if result["finish_reason"] == "stop":
        assert ids[-1] in stop_ids and not set(ids[:-1]) & set(stop_ids)
    else:
        assert len(ids) == 200 and not set(ids) & set(stop_ids)


def test_text_only_and_token_id_inputs(main_server, tiny_pipe):
    prompt = tiny_pipe.processor.apply_chat_template([{"role": "user", "content": "Hello there!"}])
    by_text = main_server.post("/generate", generate_body(prompt, []))
    ids = tiny_pipe.processor.tokenizer(prompt)["input_ids"]
    by_ids = main_server.post("/generate", generate_body(ids, []))
    assert by_text.status_code == by_ids.status_code == 200
    assert by_text.json()["tokens"] == by_ids.json()["tokens"]
    expected = tiny_pipe("Hello there!", GenerationConfig(max_new_tokens=24)).token_ids
    assert [t["id"] for t in by_text.json()["tokens"]] == expected


def test_n_returns_several_texts(main_server, tiny_pipe):
    prompt = tiny_pipe.processor.apply_chat_template([{"role": "user", "content": "Tell me a story."}])
    out = main_server.post("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 8, "n": 3,
                                                                          "do_sample": True, "seed": 5}}).json()
    assert len(out["generated_text"]) == 3 and len(set(out["generated_text"])) > 1


def test_tokens_counts_image_tokens(main_server, tiny_pipe):
    prompt = native_prompt(tiny_pipe)
    out = main_server.post("/tokens", {"text": prompt, "multimodal_params": {
        "images": [{"type": "base64", "data": b64("coffee.jpg")}]}}).json()
    processor = tiny_pipe.processor
    expected = processor.encode_chat(MESSAGES, grids(processor, [load_image("coffee.jpg")])).input_ids
    assert out == {"ntokens": len(expected)}


def test_status_endpoints(main_server, tiny_qwen2):
    assert main_server.get("/health").json() == {"message": "Ok"}
    assert main_server.get("/readiness").status_code == 200
    assert main_server.get("/liveness").status_code == 200
    assert main_server.get("/get_model_name").json() == {"model_name": tiny_qwen2.name}
    load = main_server.get("/token_load").json()
    assert load["kv_slots_total"] == 200000 and 0 <= load["current_load"] <= 1
    metrics = main_server.get("/metrics").text
    assert "lightvlm_requests_total" in metrics and "lightvlm_kv_slots_free" in metrics
