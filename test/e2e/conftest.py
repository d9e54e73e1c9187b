"""Servers for the end-to-end tests, started once per session on the tiny checkpoint.

Each server is stopped with SIGTERM at the end and must leave no process and no shared-memory segment
behind; the lifecycle tests check the same on servers of their own.
"""

import contextlib
import hashlib
import http.server
import threading
import time
from functools import partial

import pytest

from lightvlm import pipeline

from helpers import IMAGES, image_bytes
from server import Server

# Faults the main server injects, for the tests that prove one failing request hurts no other:
# an image whose bytes have this MD5 makes the vision encoder raise; a prompt starting with this token id makes
# the model step raise.
FAULTY_IMAGE = "coffee_palette.png"
FAULTY_TOKEN = 99

MAIN_ARGS = ["--enable_multimodal", "--max_req_total_len", "2048", "--max_total_token_num", "200000",
             "--running_max_req_size", "64", "--max_body_size", str(3 * 2**20), "--cache_capacity", "16",
             "--visual_infer_batch_size", "4", "--image_fetch_timeout", "2", "--max_image_pixels", "4000000",
             "--allow_private_media_urls"]  # the image URLs the tests serve are on loopback


def start(tmp_path_factory, name, model_dir, *args, env=None) -> Server:
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    return Server(model_dir, *args, env=env, log_path=log).wait_ready()


def stop_and_check(server: Server) -> None:
    seconds = server.stop()
    assert seconds < 10, f"server took {seconds:.1f} s to stop"
    assert server.shm_segments() == [], server.shm_segments()


@pytest.fixture(scope="session")
def main_server(tmp_path_factory, tiny_qwen2):
    env = {"LIGHTVLM_FAULT_IMAGE_MD5": hashlib.md5(image_bytes(FAULTY_IMAGE)).hexdigest(),
           "LIGHTVLM_FAULT_STEP_TOKEN": str(FAULTY_TOKEN)}
    server = start(tmp_path_factory, "main", tiny_qwen2, *MAIN_ARGS, env=env)
    yield server
    stop_and_check(server)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_qwen2):
    return pipeline(tiny_qwen2, max_batch_size=8, session_len=2048, max_total_token_num=8 * 2048, data_type="fp32")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(5)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # clients that gave up
            super().do_GET()


@pytest.fixture(scope="session")
def image_server():
    """A local HTTP server for image URLs (and a slow path for timeouts)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(IMAGES)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
