"""The connection guard and the body bounds on a bare aiohttp app (no model): the header deadline, the
connection cap, the 413 from Content-Length and the body timeout. The e2e twin is test/e2e/test_slow_clients.py."""

import asyncio
import json

from aiohttp import web

from lightvlm.common.ports import free_ports
from lightvlm.server.httpserver.app import errors_as_json
from lightvlm.server.httpserver.http_utils import BODY_TIMEOUT, read_json
from lightvlm.server.httpserver.slow_clients import GuardedSite


async def serving(header_timeout=0.5, max_connections=4, body_timeout=0.5, max_size=1024):
    app = web.Application(client_max_size=max_size, middlewares=[errors_as_json])
    app[BODY_TIMEOUT] = body_timeout

    async def echo(request):
        return web.json_response(await read_json(request))

    async def ok(request):
        return web.json_response({"message": "Ok"})

    app.router.add_post("/generate", echo)
    app.router.add_get("/health", ok)
    runner = web.AppRunner(app, keepalive_timeout=2, lingering_time=0.5)  # aiohttp drains an unread body this long
    await runner.setup()
    port = free_ports(1)[0]
    await GuardedSite(runner, "127.0.0.1", port, header_timeout=header_timeout, max_connections=max_connections).start()
    return runner, port


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = int(next(v for k, v in (line.split(":", 1) for line in lines[1:-2]) if k.lower() == "content-length"))
    return int(lines[0].split()[1]), json.loads(await reader.readexactly(length))


def run(scenario):
    async def go():
        runner, port = await serving()
        try:
            return await scenario(port)
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_unfinished_headers_are_closed_at_the_deadline():
    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        return asyncio.get_running_loop().time() - started

    assert 0.4 <= run(scenario) < 3


def test_headers_in_time_are_served_even_when_split_across_packets():
    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for piece in (b"GET /health HTTP/1.1\r\nHost: x\r", b"\n\r", b"\n"):
            writer.write(piece)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)  # past the header deadline: it was cancelled by the blank line
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        return [await answer(reader), await answer(reader)]

    assert [status for status, _ in run(scenario)] == [200, 200]


def test_a_connection_over_the_cap_is_answered_503_and_the_admitted_ones_still_work():
    async def scenario(port):
        admitted = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        refused = await answer(reader)
        assert await reader.read() == b""
        admitted[0][1].write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        served = await answer(admitted[0][0])
        for _, writer in admitted:
            writer.close()
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # below the cap again
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        return refused, served, await answer(reader)

    refused, served, again = run(scenario)
    assert refused[0] == 503 and "--max_connections" in refused[1]["message"]
    assert served[0] == again[0] == 200


def test_a_content_length_over_the_limit_is_a_413_before_the_body():
    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        return await asyncio.wait_for(answer(reader), 1)

    status, body = run(scenario)
    assert status == 413 and "--max_body_size" in body["message"]


def test_a_slow_body_is_a_408():
    async def scenario(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{\"a\"")
        return await asyncio.wait_for(answer(reader), 3)

    status, body = run(scenario)
    assert status == 408 and "--http_body_timeout" in body["message"]
