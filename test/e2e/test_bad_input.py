"""Bad input gets a clear 4xx and the server keeps serving: /health stays 200, a normal request works."""

import base64
import io
import zlib

import pytest
import requests
from PIL import Image

from helpers import image_bytes
from server import wait_for

PROMPT = "<|im_start|>user\n<img></img>\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request_with(images=None, prompt=PROMPT, **parameters):
    return {"inputs": prompt, "parameters": {"max_new_tokens": 8, **parameters},
            "multimodal_params": {"images": images if images is not None else
                                  [{"type": "base64", "data": b64(image_bytes("coffee.jpg"))}]}}


def huge_png_header() -> bytes:
    """A PNG whose header claims 20000 x 20000 pixels (the data is a stub)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC, kept valid
    return bytes(data)


def truncated_png() -> bytes:
    data = image_bytes("chelsea.png")
    return data[: len(data) // 2]


CASES = {
    "broken JSON": ("raw", b'{"inputs": "hi", "parameters": {', "not valid JSON"),
    "body is not an object": ("json", ["hi"], "must be a JSON object"),
    "missing inputs": ("json", {"parameters": {}}, "missing field 'inputs'"),
    "wrong type for max_new_tokens": ("json", request_with(max_new_tokens="8"), "parameters.max_new_tokens"),
    "wrong type for do_sample": ("json", request_with(do_sample="yes"), "parameters.do_sample"),
    "unknown parameter": ("json", request_with(max_new_token=8), "unknown field 'parameters.max_new_token'"),
    "unknown top-level field": ("json", {**request_with(), "prompt": "x"}, "unknown field 'prompt'"),
    "negative max_new_tokens": ("json", request_with(max_new_tokens=-3), "max_new_tokens must be an integer >= 1"),
    "top_p out of range": ("json", request_with(top_p=1.5), "top_p must be in (0, 1]"),
    "bad base64": ("json", request_with([{"type": "base64", "data": "@@@not base64@@@"}]), "not valid base64"),
    "bytes that are not an image": ("json", request_with([{"type": "base64", "data": b64(b"hello world" * 20)}]),
                                    "not a supported image"),
    "truncated PNG": ("json", request_with([{"type": "base64", "data": b64(truncated_png())}]), "truncated"),
    "huge-pixel header": ("json", request_with([{"type": "base64", "data": b64(huge_png_header())}]),
                          "pixels; the limit is"),
    "unknown image type": ("json", request_with([{"type": "file", "data": "/etc/passwd"}]), "images.0.type"),
    "placeholder/image count mismatch": ("json", request_with(prompt="<img></img> and <img></img>"),
                                         "2 image placeholder(s) but 1 image(s)"),
    "prompt over max_req_total_len": ("json", request_with([], prompt="word " * 2500), "--max_req_total_len"),
    "prompt + max_new_tokens over the limit": ("json", request_with(max_new_tokens=2040),
                                               "exceeds the limit of 2048"),
    "unreachable URL": ("json", request_with([{"type": "url", "data": "http://127.0.0.1:9/x.png"}]),
                        "could not fetch"),
    "non-http URL": ("json", request_with([{"type": "url", "data": "gopher://127.0.0.1/x"}]), "must be http(s)"),
    "file URL without a folder allowed": ("json", request_with([{"type": "url", "data": "file:///etc/passwd"}]),
                                          "without --allowed_local_media_path"),
    "empty token id list": ("json", request_with([], prompt=[]), "empty list of token ids"),
    "token id outside the vocabulary": ("json", request_with([], prompt=[1, 2, 10**9]), "token ids must be in [0, "),
    "min above max tokens": ("json", request_with(min_new_tokens=9), "min_new_tokens (9) exceeds max_new_tokens"),
    "huge top_k": ("json", request_with(do_sample=True, top_k=10**20), "top_k must be -1 (off) or an integer"),
    "seed out of range": ("json", request_with(do_sample=True, seed=2**70), "seed must be an integer in"),
    "n too large": ("json", request_with(n=1000), "n and best_of must be between 1 and 16"),
    "lone surrogate in inputs": ("raw", b'{"inputs": "a\\ud800b", "parameters": {"max_new_tokens": 4}}',
                                 "inputs contains an unpaired surrogate (U+D800) at character 1"),
    "JSON nested 100,000 deep": ("raw", b"[" * 100_000, "deeper than the limit of 64 levels"),
    "URL with an impossible host": ("json", request_with([{"type": "url", "data": f"http://{'a' * 70}.com/x.png"}]),
                                    "could not fetch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_4xx_with_a_message(main_server, case):
    kind, payload, expected = CASES[case]
    if kind == "raw":
        response = requests.post(main_server.url + "/generate", data=payload, timeout=30)
    else:
        response = main_server.post("/generate", payload)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    message = response.json()["message"]
    assert expected in message, message
    assert main_server.get("/health").status_code == 200


def test_body_over_max_body_size_is_413(main_server):
    response = main_server.post("/generate", request_with([{"type": "base64", "data": "A" * (4 * 2**20)}]))
    assert response.status_code == 413
    assert "--max_body_size" in response.json()["message"]


def test_image_download_timeout_and_404(main_server, image_server):
    slow = main_server.post("/generate", request_with([{"type": "url", "data": f"{image_server}/slow/coffee.jpg"}]))
    assert slow.status_code == 400 and "could not fetch" in slow.json()["message"]
    missing = main_server.post("/generate", request_with([{"type": "url", "data": f"{image_server}/nope.png"}]))
    assert missing.status_code == 400 and missing.json()["message"] == "could not fetch the image URL"  # no detail


def test_rejections_are_counted_by_reason(main_server):
    main_server.post("/generate", request_with([{"type": "base64", "data": b64(b"nope" * 50)}]))
    metrics = main_server.get("/metrics").text
    assert 'lightvlm_images_rejected_total{reason="not_an_image"}' in metrics


OPENAI_CASES = {
    "empty messages": ("/v1/chat/completions", {"messages": []}, "messages must not be empty"),
    "number as a text part": ("/v1/chat/completions",
                              {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                         {"type": "text", "text": 5}]}]},
                              "messages[0].content[1].text must be a string"),
    "number as content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
                          "messages[0].content must be a string or a list of parts"),
    "lone surrogate in a chat text part": (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udc00"}]}]}',
        "messages[0].content[0].text contains an unpaired surrogate (U+DC00) at character 1"),
    "lone surrogate in a completion prompt": ("/v1/completions", b'{"prompt": ["ok", "\\ud800"], "max_tokens": 2}',
                                              "prompt[1] contains an unpaired surrogate"),
    "JSON nested 100,000 deep": ("/v1/chat/completions", b"{\"a\":" * 100_000, "deeper than the limit of 64"),
}


@pytest.mark.parametrize("case", list(OPENAI_CASES))
def test_bad_openai_input_gets_400_with_an_openai_error(main_server, case):
    path, payload, expected = OPENAI_CASES[case]
    if isinstance(payload, bytes):
        response = requests.post(main_server.url + path, data=payload, timeout=30)
    else:
        response = main_server.post(path, payload)
    assert response.status_code == 400, (response.status_code, response.text)
    error = response.json()["error"]
    assert expected in error["message"], error
    assert error["code"] == 400 and error["type"] == "invalid_request_error"


def test_aiohttp_errors_are_json_on_each_face(main_server):
    native = requests.get(main_server.url + "/no/such/path", timeout=30)
    assert native.status_code == 404 and native.json() == {"message": "no route for GET /no/such/path"}
    openai = requests.post(main_server.url + "/v1/no_such_path", json={}, timeout=30)
    assert openai.status_code == 404 and openai.json()["error"]["code"] == 404
    wrong_method = requests.get(main_server.url + "/generate", timeout=30)
    assert wrong_method.status_code == 405 and "use POST" in wrong_method.json()["message"]


def test_server_still_serves_after_bad_input(main_server):
    response = main_server.post("/generate", request_with())
    assert response.status_code == 200 and response.json()["count_output_tokens"] >= 1
    assert wait_for(lambda: main_server.get("/token_load").json()["kv_slots_used"] == 0)
    chat = main_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 4})
    assert chat.status_code == 200, chat.text


def test_request_needing_more_cache_than_exists_is_rejected_not_parked(main_server):
    """The main server's cache holds 16 entries; 17 distinct images can never fit at once."""
    images = []
    for i in range(17):
        out = io.BytesIO()
        Image.new("RGB", (12, 12), (i * 15, 40, 200)).save(out, format="PNG")
        images.append({"type": "base64", "data": b64(out.getvalue())})
    prompt = "<|im_start|>user\n" + "<image>" * 17 + "Compare them.<|im_end|>\n<|im_start|>assistant\n"
    response = main_server.post("/generate", request_with(images, prompt=prompt), timeout=30)
    assert response.status_code == 400
    assert "needs more embedding cache than exists" in response.json()["message"]
    assert "--cache_capacity" in response.json()["message"]
