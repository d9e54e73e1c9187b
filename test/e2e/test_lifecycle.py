"""Start-up, text-only mode, failing rooms, failing requests, and shutdown."""

import base64
import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from conftest import FAULTY_IMAGE, FAULTY_TOKEN, start
from helpers import image_bytes
from server import Server, alive

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def run_cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightvlm.server.api_server", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_explains_every_flag():
    out = run_cli("--help").stdout
    for flag in ("--host", "--port", "--model_dir", "--model_name", "--tp", "--data_type", "--mem_fraction",
                 "--max_total_token_num", "--max_req_total_len", "--batch_max_tokens", "--running_max_req_size",
                 "--trust_remote_code", "--enable_multimodal", "--visual_infer_batch_size", "--cache_capacity",
                 "--visual_dp", "--visual_tp", "--max_body_size", "--llm_threads", "--visual_threads",
                 "--graceful_shutdown_timeout"):
        assert flag in out, flag


@pytest.mark.parametrize(("args", "message"), [
    (["--tp", "0"], "--tp must be >= 1"),
    (["--max_total_token_num", "100", "--max_req_total_len", "2048"], "raise --max_total_token_num or lower"),
    (["--max_req_total_len", "100000"], "exceeds the model's max_position_embeddings"),
    (["--mem_fraction", "1.5"], "--mem_fraction must be in (0, 1]"),
])
def test_impossible_values_fail_at_start_up_saying_what_to_change(tiny_qwen2, args, message):
    result = run_cli("--model_dir", str(tiny_qwen2), *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_bad_image_length_env_fails_at_start_up(tiny_qwen2):
    result = subprocess.run([sys.executable, "-m", "lightvlm.server.api_server", "--model_dir", str(tiny_qwen2)],
                            capture_output=True, text=True, timeout=180, env={"INTERNVL_IMAGE_LENGTH": "256",
                                                                             "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "INTERNVL_IMAGE_LENGTH=256 contradicts the checkpoint" in result.stderr


def test_a_room_failing_at_start_up_stops_everything_with_its_traceback(tiny_qwen2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen2, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.language_model.norm.weight"]
    save_file(tensors, broken / "model.safetensors")
    server = Server(broken, "--enable_multimodal", log_path=tmp_path / "log")
    code = server.process.wait(timeout=180)
    output = server.output()
    assert code != 0
    assert "worker0 failed to start" in output and "Traceback" in output
    assert "missing the tensor for language.language_model.norm.weight" in output
    assert not [p for p in server.descendants if alive(p)]


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    """No --model_dir and no --enable_multimodal: the small demo checkpoint, built into a fresh cache."""
    cache = tmp_path_factory.mktemp("cache")
    server = start(tmp_path_factory, "text-only", None, "--max_req_total_len", "1024",
                   "--max_total_token_num", "20000", "--api_key", "sesame", "--allow_origins", "http://app.example",
                   env={"LIGHTVLM_CACHE": str(cache)})
    server.cache = cache
    yield server
    server.stop()


def test_without_model_dir_the_demo_is_built_once_and_said_to_be_random(text_server):
    assert (text_server.cache / "demo-internvl-small" / "config.json").exists()
    assert "RANDOM" in text_server.output()
    assert text_server.get("/get_model_name").json() == {"model_name": "demo-internvl-small"}


def test_text_only_server_rejects_images_with_400(text_server):
    ok = text_server.post("/generate", {"inputs": CHAT.format("Hello!"), "parameters": {"max_new_tokens": 5}})
    assert ok.status_code == 200
    images = [{"type": "base64", "data": base64.b64encode(image_bytes("coffee.jpg")).decode()}]
    refused = text_server.post("/generate", {"inputs": CHAT.format("<image>Hi"), "multimodal_params":
                                             {"images": images}})
    assert refused.status_code == 400 and "--enable_multimodal" in refused.json()["message"]


def test_api_key_is_required_except_for_probes(text_server):
    body = {"inputs": CHAT.format("Hello!"), "parameters": {"max_new_tokens": 3}}
    for path, payload in (("/generate", body), ("/v1/chat/completions",
                                                {"model": "m", "messages": [{"role": "user", "content": "hi"}]})):
        refused = requests.post(text_server.url + path, json=payload, timeout=30)
        assert refused.status_code == 401
        wrong = requests.post(text_server.url + path, json=payload, headers={"Authorization": "Bearer nope"},
                              timeout=30)
        assert wrong.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"  # OpenAI's shape on /v1 routes
    assert text_server.post("/generate", body).status_code == 200
    assert requests.get(text_server.url + "/health", timeout=10).status_code == 200
    client = openai.OpenAI(base_url=text_server.url + "/v1", api_key="sesame")
    assert client.models.list().data[0].id == "demo-internvl-small"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=text_server.url + "/v1", api_key="wrong").models.list()


def test_cors_for_allowed_origins_only(text_server):
    preflight = requests.options(text_server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = requests.get(text_server.url + "/health", headers={"Origin": "http://evil.example"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in other.headers


def test_sigint_stops_the_text_server(text_server):
    descendants = text_server.descendants
    assert descendants
    seconds = text_server.stop(signal.SIGINT)
    assert seconds < 10 and text_server.process.returncode == 0
    assert not [p for p in descendants if alive(p)]


def faulty_requests():
    good = {"inputs": CHAT.format("<img></img>Describe."), "parameters": {"max_new_tokens": 12},
            "multimodal_params": {"images": [{"type": "base64",
                                              "data": base64.b64encode(image_bytes("rocket.jpg")).decode()}]}}
    bad_image = {**good, "multimodal_params": {"images": [
        {"type": "base64", "data": base64.b64encode(image_bytes(FAULTY_IMAGE)).decode()}]}}
    bad_step = {"inputs": [FAULTY_TOKEN, 1, 2, 3], "parameters": {"max_new_tokens": 12}}
    return good, bad_image, bad_step


def test_a_request_that_crashes_the_encoder_or_the_step_fails_alone_with_500(main_server):
    good, bad_image, bad_step = faulty_requests()
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda b: main_server.post("/generate", b),
                                  [good, bad_image, good, bad_step, good, good]))
    codes = [r.status_code for r in responses]
    assert codes == [200, 500, 200, 500, 200, 200], [r.text for r in responses]
    assert "vision encoder failed" in responses[1].json()["message"]
    assert "model worker failed" in responses[3].json()["message"]
    assert main_server.get("/health").status_code == 200
    assert main_server.post("/generate", good).status_code == 200
    metrics = main_server.get("/metrics").text
    assert 'lightvlm_requests_total{status="error_500"}' in metrics


def test_a_stream_failing_midway_ends_with_an_error_event(main_server):
    _, _, bad_step = faulty_requests()
    with requests.post(main_server.url + "/generate_stream", json=bad_step, stream=True, timeout=60) as response:
        assert response.status_code == 200  # the first tokens were already on their way
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
    assert [e["finished"] for e in events] == [False, False, True]
    assert events[-1]["finish_reason"] == "error" and events[-1]["status"] == 500
    assert "model worker failed" in events[-1]["error"]
    assert main_server.get("/health").status_code == 200


def test_metrics_are_prometheus_text(main_server):
    good, _, _ = faulty_requests()
    assert main_server.post("/generate", good).status_code == 200
    time.sleep(0.3)  # rooms report about ten times a second
    parsed = list(text_string_to_metric_families(main_server.get("/metrics").text))
    families = {f.name: f for f in parsed}
    assert len(families) == len(parsed), "two metric families share a name"
    for name in ("lightvlm_requests", "lightvlm_time_to_first_token_seconds", "lightvlm_time_per_output_token_seconds",
                 "lightvlm_queue_time_seconds", "lightvlm_kv_slots_used", "lightvlm_kv_slots_free",
                 "lightvlm_running_requests", "lightvlm_waiting_requests", "lightvlm_encoder_batch_size",
                 "lightvlm_encoder_batch_seconds", "lightvlm_embed_cache_hits", "lightvlm_embed_cache_misses",
                 "lightvlm_embed_cache_entries", "lightvlm_embed_cache_bytes", "lightvlm_images_rejected"):
        assert name in families, name
    assert families["lightvlm_encoder_batch_size"].type == "histogram"
    count = next(s.value for s in families["lightvlm_queue_time_seconds"].samples if s.name.endswith("_count"))
    assert count >= 1
