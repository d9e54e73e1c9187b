"""--tp 2 and --visual_dp 2 (each replica itself split over --visual_tp 2) give the greedy tokens of one
process each, and SIGTERM stops everything cleanly."""

import base64
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import MAIN_ARGS, start
from helpers import image_bytes
from server import alive, children_of

NAMES = ["coffee.jpg", "chelsea_rgba.png", "coffee_strip_600x40.jpg", "camera_gray.png"]


def requests_to_compare():
    bodies = []
    for i, name in enumerate(NAMES):
        images = [{"type": "base64", "data": base64.b64encode(image_bytes(name)).decode()}]
        bodies.append({"inputs": f"<|im_start|>user\n<img></img>\nQuestion {i}: what is shown?<|im_end|>\n"
                                 "<|im_start|>assistant\n",
                       "parameters": {"max_new_tokens": 32, "min_new_tokens": 0, "return_details": True},
                       "multimodal_params": {"images": images}})
    bodies.append({"inputs": "<|im_start|>user\nJust text, please.<|im_end|>\n<|im_start|>assistant\n",
                   "parameters": {"max_new_tokens": 32, "min_new_tokens": 0, "return_details": True}})
    return bodies


def token_ids(server, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrently, so the replicas share the work
        responses = list(pool.map(lambda b: server.post("/generate", b), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [[t["id"] for t in r.json()["tokens"]] for r in responses]


@pytest.fixture(scope="module")
def parallel_server(tmp_path_factory, tiny_qwen2):
    server = start(tmp_path_factory, "parallel", tiny_qwen2, *MAIN_ARGS, "--tp", "2", "--visual_dp", "2",
                   "--visual_tp", "2")
    yield server
    server.stop()


def test_tp2_and_visual_dp2_give_the_same_tokens_as_one_process(main_server, parallel_server):
    bodies = requests_to_compare()
    reference = token_ids(main_server, bodies)
    assert token_ids(parallel_server, bodies) == reference
    metrics = parallel_server.get("/metrics").text
    assert "lightvlm_images_encoded_total" in metrics


def test_parallel_server_runs_two_workers_and_two_encoders(parallel_server):
    output = parallel_server.output()
    assert "rank 1/2 ready" in output
    assert "encoder replica 1 rank 1 ready" in output
    # without --llm_threads / --visual_threads, the 6 compute processes share the cores as they work
    assert output.count("threads shared among busy processes") == 6


def test_sigterm_stops_every_process_and_segment(parallel_server):
    """Runs last in this module: it stops the parallel server."""
    assert len(children_of(parallel_server.process.pid)) >= 10  # 2 workers, 4 encoders and the 4 managers
    assert parallel_server.shm_segments(), "the image requests above left cache entries in shared memory"
    seconds = parallel_server.stop(signal.SIGTERM)
    assert seconds < 10
    assert parallel_server.process.returncode == 0
    assert not [p for p in parallel_server.descendants if alive(p)]
    assert parallel_server.shm_segments() == []
    assert "leaked" not in parallel_server.output()  # Python's resource tracker had nothing left to clean up
