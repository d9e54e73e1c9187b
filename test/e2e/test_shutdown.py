"""Every request gets an answer when the server stops: SIGTERM under load, a room killed, the launcher killed."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import start
from server import Server, alive, wait_for

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
GRACE = 3  # --graceful_shutdown_timeout of these servers
MARGIN = 8  # what the test allows past it: failing the rest, stopping the rooms
# outlasts any grace period here, also on a CPU that decodes the tiny model at 1 ms per step
LONG = {"max_new_tokens": 8000, "min_new_tokens": 8000, "ignore_eos": True}
ARGS = ["--max_req_total_len", "8192", "--max_total_token_num", "66000", "--graceful_shutdown_timeout", str(GRACE)]


def ipc_dir(server: Server) -> Path:
    return Path(re.search(r"IPC folder (\S+)", server.output()).group(1))


def native_stream(server: Server, parameters: dict) -> dict:
    body = {"inputs": CHAT.format("Tell me a story."), "parameters": parameters}
    with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=60) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "body": response.json()}
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
    return {"status": 200, "last": events[-1]}


def openai_stream(server: Server, parameters: dict) -> dict:
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
            "max_tokens": parameters["max_new_tokens"], "min_tokens": parameters.get("min_new_tokens", 1),
            "ignore_eos": parameters.get("ignore_eos", False)}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "body": response.json()}
        lines = [line[6:] for line in response.iter_lines() if line.startswith(b"data: ")]
    return {"status": 200, "lines": lines}


def native_whole(server: Server, parameters: dict) -> dict:
    response = requests.post(server.url + "/generate", json={"inputs": CHAT.format("Hi"), "parameters": parameters},
                             timeout=60)
    return {"status": response.status_code, "body": response.json()}


def openai_whole(server: Server, parameters: dict) -> dict:
    body = {"model": server.model_name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": parameters["max_new_tokens"], "min_tokens": parameters.get("min_new_tokens", 1),
            "ignore_eos": parameters.get("ignore_eos", False)}
    response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    return {"status": response.status_code, "body": response.json()}


class InFlight:
    """Requests running in threads; each result says how it ended and when."""

    def __init__(self, server: Server, calls: list):
        self.results: dict[int, dict] = {}
        self.threads = [threading.Thread(target=self.run, args=(i, fn, server, params), daemon=True)
                        for i, (fn, params) in enumerate(calls)]
        self.calls = calls
        for thread in self.threads:
            thread.start()

    def run(self, index, fn, server, params):
        try:
            result = fn(server, params)
        except Exception as e:  # noqa: BLE001 (a dropped connection is what the tests look for)
            result = {"status": None, "exception": repr(e)}
        result["ended_at"] = time.monotonic()
        self.results[index] = result

    def join(self, timeout: float) -> dict[int, dict]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not [t for t in self.threads if t.is_alive()], "a request was left hanging"
        return self.results


def check_answered(fn, result: dict, must_fail: bool) -> None:
    """A complete answer, or the error of its face; never a dropped connection."""
    assert result["status"] in (200, 503), result
    if fn in (native_whole, openai_whole):
        if result["status"] == 503:
            error = result["body"]["message"] if fn is native_whole else result["body"]["error"]["message"]
            assert "shutting down" in error
        else:
            assert not must_fail, result
        return
    if result["status"] == 503:  # failed before its first token
        return
    if fn is native_stream:
        last = result["last"]
        assert last["finished"] is True
        if last["finish_reason"] == "error":
            assert last["status"] == 503 and "shutting down" in last["error"]
        else:
            assert not must_fail and last["finish_reason"] == "length", last
        return
    lines = result["lines"]
    assert lines[-1] == b"[DONE]", lines[-3:]
    last = json.loads(lines[-2])
    if "error" in last:
        assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
    else:
        assert not must_fail, last


def assert_all_gone(server: Server, folder: Path) -> None:
    assert wait_for(lambda: not [p for p in server.descendants if alive(p)], timeout=10), "a room outlived the server"
    assert server.shm_segments() == [], server.shm_segments()
    assert not folder.exists()


def test_sigterm_drains_then_ends_the_rest_with_errors(tmp_path_factory, tiny_qwen2):
    server = start(tmp_path_factory, "drain", tiny_qwen2, *ARGS)
    folder = ipc_dir(server)
    short = {"max_new_tokens": 8}
    calls = [(native_stream, LONG), (openai_stream, LONG), (native_whole, LONG), (openai_whole, LONG),
             (native_stream, LONG), (openai_stream, LONG)]
    load = InFlight(server, calls)
    time.sleep(1.5)  # all submitted, the streams under way
    quick = InFlight(server, [(native_whole, short), (openai_stream, short)])  # finish within the grace period
    time.sleep(0.2)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    ready = wait_for(lambda: (r := requests.get(server.url + "/readiness", timeout=2)).status_code == 503 and r,
                     timeout=2)
    assert ready.status_code == 503 and "shutting down" in ready.json()["message"]
    health = requests.get(server.url + "/health", timeout=2)
    assert health.status_code == 503 and "draining" in health.json()["message"]
    refused = requests.post(server.url + "/generate", json={"inputs": "hi", "parameters": short}, timeout=5)
    assert refused.status_code == 503 and "shutting down" in refused.json()["message"]
    refused = requests.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == 503

    quick_results = quick.join(GRACE + MARGIN)  # keyed by call index (filled in the order they end)
    for index, (fn, _) in enumerate(quick.calls):
        result = quick_results[index]
        check_answered(fn, result, must_fail=False)
        assert result["status"] == 200 and "error" not in str(result.get("last", "")), result
    results = load.join(GRACE + MARGIN)
    for index, (fn, _) in enumerate(calls):
        check_answered(fn, results[index], must_fail=True)
        assert GRACE - 0.5 < results[index]["ended_at"] - signalled < GRACE + MARGIN, results[index]
    server.process.wait(GRACE + MARGIN)
    assert server.process.returncode == 0
    assert_all_gone(server, folder)


def room_pid(server: Server, room: str) -> int:
    """The pid of a room, by the process name it gives itself (common/process.py)."""
    for pid in server.descendants:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == f"lvlm-{room}":
                return pid
        except OSError:
            pass
    raise AssertionError(f"no {room} among {server.descendants}")


@pytest.mark.parametrize("room", ["worker0", "router"])
def test_a_killed_room_fails_every_request_and_stops_the_server(tmp_path_factory, tiny_qwen2, room):
    server = start(tmp_path_factory, f"{room}-killed", tiny_qwen2, *ARGS)
    folder = ipc_dir(server)
    calls = [(native_stream, LONG), (openai_stream, LONG), (native_whole, LONG), (openai_whole, LONG)]
    load = InFlight(server, calls)
    time.sleep(1.5)
    killed_at = time.monotonic()
    os.kill(room_pid(server, room), signal.SIGKILL)
    statuses = []

    def poll_health():
        while server.process.poll() is None:
            try:
                statuses.append(requests.get(server.url + "/health", timeout=1).status_code)
            except requests.ConnectionError:
                statuses.append(None)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    results = load.join(5)
    for index, (fn, _) in enumerate(calls):
        check_answered(fn, results[index], must_fail=True)
        assert results[index]["ended_at"] - killed_at < 5
    server.process.wait(15)
    poller.join(2)
    assert server.process.returncode != 0
    assert 503 in statuses and 200 not in statuses[statuses.index(503):], statuses
    assert_all_gone(server, folder)


def test_the_next_start_removes_what_a_killed_launcher_left(tmp_path_factory, tiny_qwen2):
    server = start(tmp_path_factory, "launcher-killed", tiny_qwen2, *ARGS)
    folder, instance = ipc_dir(server), server.instance
    server.process.kill()
    server.process.wait(5)  # reaped: its pid is free, as after any killed launcher
    assert wait_for(lambda: not [p for p in server.descendants if alive(p)], timeout=10), "a room outlived the launcher"
    assert server.shm_segments() or folder.exists()  # what only the launcher removes: its table, its folder
    after = start(tmp_path_factory, "next-start", tiny_qwen2, *ARGS)
    try:
        assert not list(Path("/dev/shm").glob(f"lvlm{instance}_*"))
        assert not folder.exists()
    finally:
        after.stop()


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_graceful_shutdown_timeout_must_be_finite_and_not_negative(tiny_qwen2, value):
    from lightvlm.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--graceful_shutdown_timeout", value], str(tiny_qwen2), "cpu", 0)
