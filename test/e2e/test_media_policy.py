"""The media policy on a server started with its defaults: loopback URLs are refused before anything
connects, on both faces; file:// only below --allowed_local_media_path; --limit_mm_per_prompt before any
work; a phone photo reaches the model upright. (Redirects, the resolver and the one fetch-failure text
are tested on the loader itself in test/server/test_media.py.)"""

import base64
import contextlib
import http.server
import json
import threading
from functools import partial

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image

from lightvlm import GenerationConfig

from conftest import start, stop_and_check
from helpers import IMAGES, image_bytes

GENERIC = "could not fetch the image URL"  # the one answer to every refused or failed fetch


class Counting(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path.startswith("/to/"):  # a redirect to the rest of the path
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):])
            self.send_header("Content-Length", "0")
            return self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().do_GET()


@pytest.fixture(scope="module")
def files():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(IMAGES)))
    httpd.hits = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def target(files):
    """A second loopback server, the one redirects aim at."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(IMAGES)))
    httpd.hits = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "rocket.jpg").write_bytes(image_bytes("rocket.jpg"))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qwen2, media_dir):
    server = start(tmp_path_factory, "media", tiny_qwen2, "--enable_multimodal", "--max_req_total_len", "2048",
                   "--max_total_token_num", "16384", "--limit_mm_per_prompt", json.dumps({"image": 2}),
                   "--allowed_local_media_path", str(media_dir))
    yield server
    stop_and_check(server)


def chat(server, *urls, max_tokens=12):
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": server.model_name, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "Describe this image."}]}]}


def native(*images):
    prompt = "<|im_start|>user\n" + "<img></img>\n" * len(images) + "Hi<|im_end|>\n<|im_start|>assistant\n"
    return {"inputs": prompt, "parameters": {"max_new_tokens": 4}, "multimodal_params": {"images": list(images)}}


def data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def error(response) -> str:
    body = response.json()
    return body["error"]["message"] if "error" in body else body["message"]


def test_loopback_and_credential_urls_are_refused_on_both_faces(server, files):
    port = files.server_address[1]
    files.hits.clear()
    for url in (f"http://127.0.0.1:{port}/coffee.jpg", f"http://localhost:{port}/coffee.jpg",
                f"http://[::1]:{port}/coffee.jpg", f"http://127.0.0.1:{server.port}/metrics",
                f"http://0x7f.1:{port}/coffee.jpg"):
        for response in (server.post("/v1/chat/completions", chat(server, url)),
                         server.post("/generate", native({"type": "url", "data": url}))):
            assert response.status_code == 400 and error(response) == GENERIC, (url, response.text)
    for url in (f"http://me:secret@127.0.0.1:{port}/coffee.jpg", f"http://me@localhost:{port}/coffee.jpg"):
        response = server.post("/v1/chat/completions", chat(server, url))
        assert response.status_code == 400 and error(response) == GENERIC
    assert files.hits == []  # nothing ever connected
    assert server.get("/health").status_code == 200


def test_file_urls_below_the_allowed_folder_only(server, media_dir):
    by_file = server.post("/v1/chat/completions", chat(server, f"file://{media_dir}/rocket.jpg"))
    by_data = server.post("/v1/chat/completions", chat(server, data_url(image_bytes("rocket.jpg"))))
    assert by_file.status_code == 200, by_file.text
    assert by_file.json()["choices"][0]["message"] == by_data.json()["choices"][0]["message"]
    for url in (f"file://{media_dir}/../rocket.jpg", f"file://{IMAGES}/coffee.jpg", "file:///etc/passwd"):
        response = server.post("/v1/chat/completions", chat(server, url))
        assert response.status_code == 400 and error(response) == GENERIC, url


def test_more_images_than_the_limit_are_refused_before_fetching(server, files):
    port = files.server_address[1]
    files.hits.clear()
    image = {"type": "base64", "data": base64.b64encode(image_bytes("coffee.jpg")).decode()}
    response = server.post("/generate", native(image, image, image))
    assert response.status_code == 400 and "at most 2 per request (--limit_mm_per_prompt)" in error(response)
    response = server.post("/v1/chat/completions", chat(server, *[f"http://127.0.0.1:{port}/coffee.jpg"] * 3))
    assert response.status_code == 400 and "--limit_mm_per_prompt" in error(response)
    assert server.post("/generate", native(image, image)).status_code == 200


def test_a_photo_with_exif_orientation_reaches_the_model_upright(server, tiny_pipe, tmp_path):
    """The server's answer for a JPEG tagged 'rotate 90' equals the pipeline's for the image as
    transformers' load_image turns it (its grid too: the tiles follow the upright aspect ratio)."""
    photo = Image.open(IMAGES / "coffee.jpg").convert("RGB")
    exif = photo.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    photo.save(path, format="JPEG", exif=exif, quality=95)
    upright = load_image(str(path))
    assert upright.size == photo.size[::-1] and not np.array_equal(np.asarray(upright)[:5, :5], 0)
    expected = tiny_pipe(("Describe this image.", upright), GenerationConfig(max_new_tokens=12)).token_ids
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = tiny_pipe.processor.apply_chat_template(messages).replace("<IMG_CONTEXT>", "<img></img>")
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "return_details": True},
            "multimodal_params": {"images": [{"type": "base64", "data": base64.b64encode(path.read_bytes()).decode()}]}}
    response = server.post("/generate", body)
    assert response.status_code == 200, response.text
    assert [t["id"] for t in response.json()["tokens"]] == expected


def test_a_redirect_to_a_host_the_policy_refuses_is_not_followed(tmp_path_factory, tiny_qwen2, files, target):
    """Private addresses allowed for one named host only: its redirect to another loopback port is
    refused, and the target never sees a request."""
    server = start(tmp_path_factory, "media-domains", tiny_qwen2, "--enable_multimodal", "--max_req_total_len",
                   "2048", "--max_total_token_num", "16384", "--allow_private_media_urls",
                   "--allowed_media_domains", "localhost")
    try:
        origin = f"http://localhost:{files.server_address[1]}"
        assert server.post("/v1/chat/completions", chat(server, f"{origin}/coffee.jpg")).status_code == 200
        target.hits.clear()
        for url in (f"{origin}/to/http://127.0.0.1:{target.server_address[1]}/coffee.jpg",
                    f"http://127.0.0.1:{target.server_address[1]}/coffee.jpg"):
            response = server.post("/v1/chat/completions", chat(server, url))
            assert response.status_code == 400 and error(response) == GENERIC, response.text
        assert target.hits == []
        assert server.get("/health").status_code == 200
    finally:
        stop_and_check(server)
