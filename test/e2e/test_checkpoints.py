"""The real server on checkpoints transformers wrote, one per layout users have (test/references.py):
InternVL as transformers 5 saves it, as 4.x saved it, OpenGVLab's original folder (InternLM2, served with
--tp 2), and the text-only LLMs. Greedy ids from the native API equal transformers'; the OpenAI API
gives the same generation; start-up errors stop the server before it serves anything.
"""

import base64
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lightvlm.models.checkpoint import LoadedCheckpoint

from conftest import start, stop_and_check
from hf_reference import assert_same_greedy
from references import TEXT_CASES, reference_greedy, vlm_cases
from server import Server

MAX_NEW = 24
ARGS = ["--max_req_total_len", "2048", "--max_total_token_num", "20000"]
SERVED_VLMS = {"hf-qwen2": [], "legacy-llama": [], "original-internlm2": ["--tp", "2"]}


def image_data(image) -> bytes:
    with open(image.filename, "rb") as f:  # the fixture file it was loaded from
        return f.read()


def native_body(processor, messages) -> dict:
    """/generate: the chat-templated prompt (an image token where each image goes) and the images."""
    templated = [{**m, "content": [{"type": p["type"], "text": p.get("text", "")} for p in m["content"]]}
                 if isinstance(m["content"], list) else m for m in messages]
    prompt = processor.apply_chat_template(templated)
    bos = processor.tokenizer.bos_token
    images = [{"type": "base64", "data": base64.b64encode(image_data(p["image"])).decode()}
              for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    add_special_tokens = processor.adds_special_tokens_to_chats and not (bos and prompt.startswith(bos))
    return {"inputs": prompt, "multimodal_params": {"images": images},
            "parameters": {"max_new_tokens": MAX_NEW, "min_new_tokens": 0, "return_details": True,
                           "add_special_tokens": add_special_tokens}}


def openai_messages(messages) -> list[dict]:
    def part(p):
        if p["type"] != "image":
            return p
        url = "data:image/png;base64," + base64.b64encode(image_data(p["image"])).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
            for m in messages]


def check_faces(server, model_dir, ref_dir, cases: dict) -> None:
    """All cases at once on the native API (the server batches them), each against transformers; then
    the OpenAI API on each case gives the native API's generation."""
    processor = LoadedCheckpoint.open(model_dir).processor
    with ThreadPoolExecutor(len(cases)) as pool:
        native = dict(zip(cases, pool.map(lambda m: server.post("/generate", native_body(processor, m)),
                                          cases.values())))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for case, messages in cases.items():
        assert native[case].status_code == 200, native[case].text
        out = native[case].json()
        reference, inputs = reference_greedy(ref_dir, case, messages, MAX_NEW)
        assert out["prompt_tokens"] == inputs["input_ids"].shape[1], case
        assert_same_greedy(ref_dir, [t["id"] for t in out["tokens"]], reference, inputs, f"{model_dir.name}: {case}")
        chat = client.chat.completions.create(model=server.model_name, messages=openai_messages(messages),
                                              temperature=0, max_tokens=MAX_NEW)
        assert chat.choices[0].message.content == out["generated_text"][0], case
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (out["prompt_tokens"], len(out["tokens"]))


@pytest.fixture(scope="module", params=list(SERVED_VLMS))
def vlm_server(request, references, tmp_path_factory):
    name = request.param
    server = start(tmp_path_factory, name, references(name), "--enable_multimodal", *ARGS, *SERVED_VLMS[name])
    yield name, server
    stop_and_check(server)


@pytest.fixture(scope="module", params=["text-qwen2", "text-llama", "text-qwen3"])
def llm_server(request, references, tmp_path_factory):
    server = start(tmp_path_factory, request.param, references(request.param), *ARGS)
    yield request.param, server
    stop_and_check(server)


def test_vlm_greedy_ids_equal_transformers_on_both_faces(vlm_server, references):
    name, server = vlm_server
    check_faces(server, references(name), references.reference(name), vlm_cases())


def test_text_only_greedy_ids_equal_transformers_on_both_faces(llm_server, references):
    name, server = llm_server
    check_faces(server, references(name), references(name), TEXT_CASES)


def test_images_sent_to_a_text_only_model_get_400(llm_server):
    _, server = llm_server
    one_image = vlm_cases()["one image"]
    image = base64.b64encode(image_data(one_image[0]["content"][0]["image"])).decode()
    body = {"inputs": "<image> What is it?", "parameters": {"max_new_tokens": 4},
            "multimodal_params": {"images": [{"type": "base64", "data": image}]}}
    response = server.post("/generate", body)
    assert response.status_code == 400 and "accepts no images" in response.json()["message"], response.text
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="accepts no images"):
        client.chat.completions.create(model=server.model_name, messages=openai_messages(one_image), max_tokens=4)
    still_serving = server.post("/generate", {"inputs": "Still here?", "parameters": {"max_new_tokens": 2}})
    assert still_serving.status_code == 200


def failed_start(tmp_path_factory, name, model_dir, *args) -> str:
    """The output of a server that must refuse to start; /health must never have answered."""
    server = Server(model_dir, *args, log_path=tmp_path_factory.mktemp("logs") / f"{name}.log")
    with pytest.raises(RuntimeError, match="server exited with 1") as failure:
        server.wait_ready(timeout=120)
    server.stop()
    return str(failure.value)


def test_processor_and_vision_tile_sizes_that_differ_stop_the_server(references, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("mismatch") / "hf-llama-448"
    shutil.copytree(references("hf-llama"), model_dir)
    config = json.loads((model_dir / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"height": 448, "width": 448}
    (model_dir / "processor_config.json").write_text(json.dumps(config))
    output = failed_start(tmp_path_factory, "mismatch", model_dir, "--enable_multimodal", *ARGS)
    assert ("the processor's tile size is 448 (processor_config.json) but the vision tower's image_size is 96 "
            "(config.json vision_config)") in output


def test_enable_multimodal_on_a_text_only_model_stops_the_server(references, tmp_path_factory):
    output = failed_start(tmp_path_factory, "text-multimodal", references("text-qwen3"), "--enable_multimodal", *ARGS)
    assert ("is a text-only language model (Qwen3ForCausalLM) and takes no images: start the server without "
            "--enable_multimodal") in output
