"""Videos through the real server: a video_url (data: URL or http) and multimodal_params.videos answer
with the text the one-process pipeline gives on the same decoded frames, usage counts the video's
tokens, a repeated video is an embedding-cache hit, and every bad video (not a video, truncated, no
frames, audio only, over each cap) is a 400 naming the problem while the server keeps serving and
leaves no shared memory or cache reference behind.

One server for the module: Qwen3-VL (transformers' checkpoint), whose videos take the most plumbing:
one part per temporal patch, each its own item, segment and cache entry. InternVL's frames go through
the session's main server."""

import base64
import http.server
import threading
import time
from functools import partial

import pytest

from lightvlm import GenerationConfig, pipeline

from conftest import QuietHandler, start, stop_and_check
from qwen_vl_references import reference_checkpoint
from server import wait_for

MAX_NEW = 12
CAPS = ["--max_video_seconds", "4", "--max_video_frames", "40", "--video_max_pixels", "20000",
        "--max_video_bytes", "150000"]
ARGS = ["--enable_multimodal", "--max_req_total_len", "2048", "--max_total_token_num", "16384",
        "--cache_capacity", "64", "--allow_private_media_urls", *CAPS]


@pytest.fixture(scope="module")
def model_dir(checkpoints_dir):
    return reference_checkpoint(checkpoints_dir, "qwen3_vl")


@pytest.fixture(scope="module")
def video_server(tmp_path_factory, model_dir):
    server = start(tmp_path_factory, "video", model_dir, *ARGS)
    yield server
    stop_and_check(server)


@pytest.fixture(scope="module")
def pipe(model_dir):
    made = pipeline(model_dir, max_batch_size=4, session_len=2048, max_total_token_num=8192, data_type="fp32")
    yield made
    made.close()


@pytest.fixture(scope="module")
def video_url_server(video_fixtures):
    """Loopback HTTP for the test videos."""
    folder = next(iter(video_fixtures.values())).parent
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def data_url(path) -> str:
    kind = "webm" if path.suffix == ".webm" else "mp4"
    return f"data:video/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def chat(url: str, text: str = "What happens here?", **sampling) -> dict:
    return {"temperature": 0, "max_tokens": MAX_NEW, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url, **sampling}}, {"type": "text", "text": text}]}]}


def expected(pipe, url: str, text: str = "What happens here?", **sampling):
    conversation = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **sampling}},
                                                 {"type": "text", "text": text}]}]
    return pipe(conversation, GenerationConfig(max_new_tokens=MAX_NEW))


def stat(server, name: str) -> float:
    return server.get("/token_load").json()[name]


def settled_stat(server, name: str, quiet: float = 1.2) -> float:
    """The stat once it has not changed for `quiet` seconds: a room's stats arrive at most 0.1 s apart
    while they change and at least every second (StatsTimer), so a fresh read can lag a finished request."""
    value = stat(server, name)
    while True:
        time.sleep(quiet)
        value, previous = stat(server, name), value
        if value == previous:
            return value


def test_video_url_answers_like_the_pipeline_and_counts_its_tokens(video_server, pipe, video_fixtures):
    url = data_url(video_fixtures["pan.mp4"])
    r = video_server.post("/v1/chat/completions", chat(url, fps=3))
    assert r.status_code == 200, r.text
    body = r.json()
    reference = expected(pipe, url, fps=3)
    assert body["choices"][0]["message"]["content"] == reference.text
    assert body["usage"]["prompt_tokens"] == reference.input_token_len
    text_only = pipe([{"role": "user", "content": "What happens here?"}], GenerationConfig(max_new_tokens=1))
    assert reference.input_token_len > text_only.input_token_len + 40  # the video's rows and timestamps


def test_a_repeated_video_is_a_cache_hit(video_server, pipe, video_fixtures, video_url_server):
    """The same bytes and sampling: every part found in the embedding cache, nothing encoded again; fetched
    over http(s) the same way images are."""
    url = f"{video_url_server}/pan.webm"
    before = stat(video_server, "images_encoded")
    first = video_server.post("/v1/chat/completions", chat(url, text="Once."))
    assert first.status_code == 200, first.text
    encoded, hits = settled_stat(video_server, "images_encoded"), settled_stat(video_server, "embed_cache_hits")
    assert encoded > before
    again = video_server.post("/v1/chat/completions", chat(url, text="Twice."))
    assert again.status_code == 200, again.text
    parts = wait_for(lambda: stat(video_server, "embed_cache_hits") - hits, timeout=5)
    assert parts >= 2 and stat(video_server, "images_encoded") == encoded  # one hit per temporal patch
    assert again.json()["choices"][0]["message"]["content"] == expected(
        pipe, data_url(video_fixtures["pan.webm"]), text="Twice.").text


def test_native_videos_at_the_video_placeholder(video_server, pipe, video_fixtures):
    """multimodal_params.videos at `<video>` in a raw prompt: the chat template's prompt, the same answer."""
    templated = pipe.processor.apply_chat_template([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What happens here?"}]}])
    raw = templated.replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>")
    video = {"type": "base64", "data": base64.b64encode(video_fixtures["longer.mp4"].read_bytes()).decode(),
             "num_frames": 6}
    body = {"inputs": raw, "parameters": {"max_new_tokens": MAX_NEW, "min_new_tokens": 0, "return_details": True},
            "multimodal_params": {"videos": [video]}}
    r = video_server.post("/generate", body)
    assert r.status_code == 200, r.text
    reference = expected(pipe, data_url(video_fixtures["longer.mp4"]), num_frames=6)
    assert [t["id"] for t in r.json()["tokens"]] == reference.token_ids
    assert r.json()["prompt_tokens"] == reference.input_token_len
    tokens = video_server.post("/tokens", {"text": raw, "multimodal_params": {"videos": [video]}})
    assert tokens.json()["ntokens"] == reference.input_token_len


BAD = {  # fixture -> what the 400 must say
    "not_a_video.mp4": "not a video PyAV can read",
    "truncated.mp4": "truncated file",
    "cut.mp4": "truncated",
    "zero_frames.mp4": "no decodable frames",
    "audio.m4a": "no video stream",
    "long.webm": "--max_video_seconds",
    "dense.mp4": "--max_video_frames",
    "large.mp4": "--video_max_pixels",
    "noise.mp4": "larger than the limit of 150000 bytes",
}


def test_bad_videos_are_400s_and_the_server_keeps_serving(video_server, video_fixtures, video_url_server):
    for name, message in BAD.items():
        r = video_server.post("/v1/chat/completions", chat(data_url(video_fixtures[name])))
        assert r.status_code == 400 and message in r.json()["error"]["message"], (name, r.text)
    fetched = video_server.post("/v1/chat/completions", chat(f"{video_url_server}/noise.mp4"))
    assert fetched.status_code == 400 and "could not fetch the video URL" in fetched.text  # over the cap
    for sampling, message in (({"fps": 2, "num_frames": 4}, "not both"), ({"fsp": 2}, "unknown field"),
                              ({"fps": -1}, "fps must be")):
        r = video_server.post("/v1/chat/completions", chat(data_url(video_fixtures["pan.mp4"]), **sampling))
        assert r.status_code == 400 and message in r.text, (sampling, r.text)
    native = {"inputs": "<video><video> two", "multimodal_params": {"videos": [
        {"type": "base64", "data": base64.b64encode(video_fixtures["pan.mp4"].read_bytes()).decode()}]}}
    r = video_server.post("/generate", native)
    assert r.status_code == 400 and "2 video placeholder(s) but 1 video(s)" in r.text
    ok = video_server.post("/v1/chat/completions", chat(data_url(video_fixtures["pan.mp4"]), fps=2))
    assert ok.status_code == 200, ok.text
    assert wait_for(lambda: stat(video_server, "embed_cache_held_entries") == 0, timeout=5)
    assert not [s for s in video_server.shm_segments() if s.startswith(f"lvlm{video_server.instance}_b")]


def test_internvl_frames_through_the_server(main_server, tiny_pipe, video_fixtures):
    """InternVL: each frame a tile; the main server's answer is the pipeline's."""
    url = data_url(video_fixtures["pan.webm"])
    r = main_server.post("/v1/chat/completions", chat(url, num_frames=3))
    assert r.status_code == 200, r.text
    reference = expected(tiny_pipe, url, num_frames=3)
    assert r.json()["choices"][0]["message"]["content"] == reference.text
    assert r.json()["usage"]["prompt_tokens"] == reference.input_token_len
