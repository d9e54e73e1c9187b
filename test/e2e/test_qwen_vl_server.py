"""Qwen-VL through the real server, split as far as it goes on the CPU (--tp 2, --visual_tp 2) and with a
server-wide --max_pixels below the checkpoint's: both faces give the text the one-process pipeline
gives, count the prompt tokens transformers' processor makes, and take per-request resolution bounds
that may only lower the server's.

One server for the module: Qwen3-VL, whose image rows are the widest (DeepStack features ride along
through the embedding cache and shared memory to every worker rank). What differs between the three
models of the line lives in the model code, which test_qwen_vl_parity.py runs for all three."""

import base64

import pytest

from lightvlm import GenerationConfig, pipeline
from lightvlm.config import parse_config
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.processor import split_messages

from conftest import start, stop_and_check
from helpers import image_bytes, load_image
from qwen_vl_references import assert_same_greedy, hf_generate, hf_inputs, messages, reference_checkpoint

MAX_NEW = 16
IMAGES = ("coffee.jpg", "coffee_strip_600x40.jpg")
TEXT = "Compare these two pictures."


def factor_of(model_dir) -> int:
    processor = LoadedCheckpoint.open(model_dir).processor
    return processor.patch_size * processor.merge_size


@pytest.fixture(scope="module")
def qwen_vl_reference(checkpoints_dir):
    return reference_checkpoint(checkpoints_dir, "qwen3_vl")


@pytest.fixture(scope="module")
def served(tmp_path_factory, qwen_vl_reference):
    """(server, its --max_pixels, the pipeline with the same bound)."""
    max_pixels = factor_of(qwen_vl_reference) ** 2 * 30
    server = start(tmp_path_factory, qwen_vl_reference.name, qwen_vl_reference, "--enable_multimodal",
                   "--tp", "2", "--visual_tp", "2", "--max_pixels", max_pixels, "--max_req_total_len", "1024",
                   "--max_total_token_num", "16384", "--cache_capacity", "8")
    pipe = pipeline(qwen_vl_reference, max_batch_size=2, session_len=1024, max_total_token_num=2048,
                    max_pixels=max_pixels, data_type="fp32")
    yield server, max_pixels, pipe
    stop_and_check(server)


def b64(name: str) -> str:
    return base64.b64encode(image_bytes(name)).decode()


def native_body(prompt: str, **bounds) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "min_new_tokens": 0, "return_details": True},
            "multimodal_params": {"images": [{"type": "base64", "data": b64(n), **bounds} for n in IMAGES]}}


def chat_body(**kwargs) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(n)}} for n in IMAGES]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": TEXT}]}],
            "max_tokens": MAX_NEW, "temperature": 0, **kwargs}


def conversation() -> list[dict]:
    return messages(TEXT, [load_image(n) for n in IMAGES])


def raw_prompt(processor) -> str:
    """The chat template's text with `<image>` where it wrapped each image (the native face's input)."""
    text = processor.apply_chat_template(split_messages(conversation())[0])
    return text.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def test_both_faces_give_the_pipelines_text_and_transformers_prompt_tokens(served, qwen_vl_reference):
    server, max_pixels, pipe = served
    expected = pipe(conversation(), GenerationConfig(max_new_tokens=MAX_NEW))
    reference, inputs = hf_generate(qwen_vl_reference, conversation(), MAX_NEW, max_pixels=max_pixels)
    assert_same_greedy(qwen_vl_reference, expected.token_ids, reference, inputs, "pipeline")
    num_prompt = inputs["input_ids"].shape[1]
    assert num_prompt < hf_inputs(qwen_vl_reference, conversation())["input_ids"].shape[1]  # --max_pixels acts
    native = server.post("/generate", native_body(raw_prompt(pipe.processor)))
    assert native.status_code == 200, native.text
    assert native.json()["prompt_tokens"] == num_prompt
    assert [t["id"] for t in native.json()["tokens"]] == expected.token_ids
    assert native.json()["generated_text"] == [expected.text]
    chat = server.post("/v1/chat/completions", chat_body())
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == num_prompt
    assert chat.json()["choices"][0]["message"]["content"] == expected.text


def test_lower_bounds_per_request_change_the_tokens_as_transformers_does(served, qwen_vl_reference):
    """The same images again, smaller: other cache entries (the key covers the grid), fewer tokens."""
    server, max_pixels, pipe = served
    lower = factor_of(qwen_vl_reference) ** 2 * 8
    reference, inputs = hf_generate(qwen_vl_reference, conversation(), MAX_NEW, max_pixels=lower)
    num_prompt = inputs["input_ids"].shape[1]
    assert num_prompt < hf_inputs(qwen_vl_reference, conversation(), max_pixels=max_pixels)["input_ids"].shape[1]
    native = server.post("/generate", native_body(raw_prompt(pipe.processor), max_pixels=lower))
    assert native.status_code == 200, native.text
    assert native.json()["prompt_tokens"] == num_prompt
    assert_same_greedy(qwen_vl_reference, [t["id"] for t in native.json()["tokens"]], reference, inputs,
                       "native max_pixels")
    chat = server.post("/v1/chat/completions", chat_body(mm_processor_kwargs={"max_pixels": lower}))
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == num_prompt
    assert chat.json()["choices"][0]["message"]["content"] == native.json()["generated_text"][0]
    body = native_body(raw_prompt(pipe.processor), max_pixels=lower)
    tokens = server.post("/tokens", {"text": body["inputs"], "multimodal_params": body["multimodal_params"]})
    assert tokens.status_code == 200 and tokens.json()["ntokens"] == num_prompt


def test_bounds_above_the_servers_are_a_400_naming_it(served):
    server, max_pixels, _ = served
    too_many = {"max_pixels": max_pixels + 1}
    for response in (server.post("/v1/chat/completions", chat_body(mm_processor_kwargs=too_many)),
                     server.post("/generate", native_body("<image><image>", **too_many))):
        assert response.status_code == 400
        assert f"above this server's bound of {max_pixels}" in response.text
    crossed = {"min_pixels": max_pixels // 2, "max_pixels": max_pixels // 4}
    response = server.post("/generate", native_body("<image><image>", **crossed))
    assert response.status_code == 400 and "min_pixels" in response.text
    response = server.post("/v1/chat/completions", chat_body(mm_processor_kwargs={"max_pixel": 100}))
    assert response.status_code == 400 and "max_pixel" in response.text
    response = server.post("/generate", native_body("<image><image>", max_pixels="many"))
    assert response.status_code == 400 and "max_pixels" in response.text
    assert server.get("/health").status_code == 200


def test_internvl_refuses_resolution_bounds(main_server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "mm_processor_kwargs": {"max_pixels": 1000}}
    response = main_server.post("/v1/chat/completions", body)
    assert response.status_code == 400 and "fixed-size tiles" in response.text
    body = {"inputs": "<image>", "multimodal_params": {"images": [
        {"type": "base64", "data": b64("coffee.jpg"), "max_pixels": 1000}]}}
    response = main_server.post("/generate", body)
    assert response.status_code == 400 and "fixed-size tiles" in response.text


def test_server_wide_bounds_are_checked_on_the_command_line():
    with pytest.raises(SystemExit, match="--min_pixels 5000 is above --max_pixels 4000"):
        parse_config(["--min_pixels", "5000", "--max_pixels", "4000"], "/tmp/model", "cpu", 0)
    with pytest.raises(SystemExit, match="--max_pixels must be >= 1"):
        parse_config(["--max_pixels", "0"], "/tmp/model", "cpu", 0)
    config = parse_config(["--max_pixels", "4000"], "/tmp/model", "cpu", 0)
    assert (config.visual.min_pixels, config.visual.max_pixels) == (None, 4000)
