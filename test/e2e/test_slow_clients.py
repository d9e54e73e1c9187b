"""Slow clients hold nothing for long: unfinished headers are closed after --http_header_timeout, a slow
body is a 408 after --http_body_timeout, a Content-Length over --max_body_size is a 413 before any body
byte, and connections over --max_connections are answered 503 and closed while the open ones keep working.
Raw sockets on loopback only."""

import json
import socket
import time

import pytest

from conftest import start, stop_and_check

HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 220
KEEP_ALIVE_TIMEOUT = 5.0
SLACK = 3.0  # two slow shared cores: how late a timer may fire and a close reach the client


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_qwen2):
    server = start(tmp_path_factory, "slow-clients", tiny_qwen2, "--max_req_total_len", "2048",
                   "--max_total_token_num", "16384", "--max_body_size", str(2**20),
                   "--http_header_timeout", str(HEADER_TIMEOUT), "--http_body_timeout", str(BODY_TIMEOUT),
                   "--max_connections", str(MAX_CONNECTIONS), "--keep_alive_timeout", str(KEEP_ALIVE_TIMEOUT))
    yield server
    stop_and_check(server)


def connect(server, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length (what the server sends on these paths)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def health_over(sock: socket.socket) -> int:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, _ = read_response(sock)
    return status


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_unfinished_headers_are_closed_after_the_header_timeout(server):
    socks = [connect(server) for _ in range(200)]
    opened = time.monotonic()
    for sock in socks:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
    assert server.get("/health").status_code == 200  # served meanwhile
    for sock in socks:
        sock.settimeout(max(0.1, opened + HEADER_TIMEOUT + SLACK - time.monotonic()))
        assert is_closed(sock), "a connection with unfinished headers is still open after the header timeout"
    elapsed = time.monotonic() - opened
    assert HEADER_TIMEOUT - 0.5 <= elapsed <= HEADER_TIMEOUT + SLACK, elapsed
    for sock in socks:
        sock.close()
    assert server.get("/health").status_code == 200


def test_a_slow_body_is_a_408_after_the_body_timeout(server):
    sock = connect(server)
    body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 2}}).encode()
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    sent = time.monotonic()
    sock.settimeout(BODY_TIMEOUT + SLACK)
    status, _, answer = read_response(sock)
    assert status == 408
    assert "--http_body_timeout" in json.loads(answer)["message"]
    assert BODY_TIMEOUT - 0.5 <= time.monotonic() - sent <= BODY_TIMEOUT + SLACK
    sock.close()
    assert server.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}}).status_code == 200


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_a_huge_content_length_is_a_413_before_any_body_byte(server, path):
    sock = connect(server)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 10000000000\r\n\r\n" % path.encode())
    sent = time.monotonic()
    sock.settimeout(BODY_TIMEOUT)  # well before the body timeout could answer
    status, headers, answer = read_response(sock)
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert "--max_body_size" in answer.decode()
    assert time.monotonic() - sent < 1.5
    sock.close()


def test_connections_over_the_cap_are_refused_while_the_open_ones_work(server):
    time.sleep(0.5)  # the other tests' connections are gone
    socks = [connect(server) for _ in range(MAX_CONNECTIONS)]  # all within the header timeout
    try:
        extra = connect(server)
        extra.settimeout(5)
        status, _, answer = read_response(extra)
        assert status == 503
        assert "--max_connections" in json.loads(answer)["message"]
        assert is_closed(extra)
        extra.close()
        assert health_over(socks[0]) == 200  # an admitted connection is served
        assert health_over(socks[-1]) == 200
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.5)  # the server sees the closes
    assert server.get("/health").status_code == 200  # a new connection is admitted again


@pytest.mark.parametrize("next_request", [b"", b"GET /health HTTP/1.1\r\nHost: 127.0"], ids=["idle", "half-sent"])
def test_a_kept_alive_connection_is_closed_after_the_keep_alive_timeout(server, next_request):
    sock = connect(server)
    assert health_over(sock) == 200
    sock.sendall(next_request)
    answered = time.monotonic()
    sock.settimeout(KEEP_ALIVE_TIMEOUT + SLACK)
    assert is_closed(sock)
    assert KEEP_ALIVE_TIMEOUT - 0.5 <= time.monotonic() - answered <= KEEP_ALIVE_TIMEOUT + SLACK
    sock.close()
