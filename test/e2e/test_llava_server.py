"""LLaVA-NeXT through the real server, split both ways (--tp 2 for the language model, --visual_tp 2 for
the CLIP tower): the OpenAI and native faces give the offline pipeline's text and tokens (one process,
no split), and the prompt is as long as transformers' processor makes it."""

import base64

import openai
import pytest

from lightvlm import GenerationConfig, pipeline

from conftest import start, stop_and_check
from helpers import image_bytes, load_image
from hf_reference import hf_messages
from llava_references import hf_inputs

ARGS = ["--enable_multimodal", "--tp", "2", "--visual_tp", "2", "--max_req_total_len", "1024",
        "--max_total_token_num", "16384", "--running_max_req_size", "8"]
NAMES = ["coffee_strip_600x40.jpg", "chelsea.png"]  # a wide one (1 x 3 crops, unpadded) and a square one


@pytest.fixture(scope="module")
def next_dir(llava_checkpoints):
    return llava_checkpoints.get("next_llama")


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory, next_dir):
    server = start(tmp_path_factory, "llava_next", next_dir, *ARGS)
    yield server
    stop_and_check(server)


@pytest.fixture(scope="module")
def next_pipe(next_dir):
    return pipeline(next_dir, max_batch_size=4, session_len=1024, max_total_token_num=4096, data_type="fp32")


def data_url(name):
    mime = "png" if name.endswith(".png") else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(image_bytes(name)).decode()


def test_openai_chat_gives_the_pipelines_text_and_transformers_prompt_length(llava_server, next_pipe, next_dir):
    client = openai.OpenAI(base_url=llava_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    content = [*({"type": "image_url", "image_url": {"url": data_url(n)}} for n in NAMES),
               {"type": "text", "text": "What differs between them?"}]
    r = client.chat.completions.create(model=llava_server.model_name, messages=[{"role": "user", "content": content}],
                                       temperature=0, max_tokens=24)
    images = [load_image(n) for n in NAMES]
    expected = next_pipe(("What differs between them?", images), GenerationConfig(max_new_tokens=24))
    assert r.choices[0].message.content == expected.text
    assert r.usage.completion_tokens == len(expected.token_ids)
    reference_ids = hf_inputs(next_dir, hf_messages("What differs between them?", images))["input_ids"]
    assert r.usage.prompt_tokens == reference_ids.shape[1] == expected.input_token_len


def test_native_generate_gives_the_pipelines_tokens(llava_server, next_pipe):
    prompt = next_pipe.processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image."}]}])
    image = {"type": "base64", "data": base64.b64encode(image_bytes(NAMES[0])).decode()}
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "min_new_tokens": 0, "return_details": True},
            "multimodal_params": {"images": [image]}}
    response = llava_server.post("/generate", body)
    assert response.status_code == 200, response.text
    out = response.json()
    expected = next_pipe(("Describe this image.", load_image(NAMES[0])), GenerationConfig(max_new_tokens=24))
    assert [t["id"] for t in out["tokens"]] == expected.token_ids
    assert out["prompt_tokens"] == expected.input_token_len


def test_videos_are_refused_by_name(llava_server):
    """LLaVA takes images only: a video is a 400 that says so, before anything is fetched."""
    body = {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/never-fetched.mp4"}},
        {"type": "text", "text": "What happens?"}]}]}
    r = llava_server.post("/v1/chat/completions", body)
    assert r.status_code == 400 and "takes no videos" in r.json()["error"]["message"], r.text
    r = llava_server.post("/generate", {"inputs": "<video> hi", "multimodal_params": {
        "videos": [{"type": "url", "data": "http://127.0.0.1:9/never-fetched.mp4"}]}})
    assert r.status_code == 400 and "takes no videos" in r.text
