"""Slow clients hold no resources for long: the listening socket's protocol factory wraps aiohttp's, so
that a connection whose request headers are not complete within `--http_header_timeout` seconds is
closed, and a connection over `--max_connections` is answered 503 and closed before aiohttp sees it.

Only the asyncio.Protocol interface is used (no aiohttp internals): the guard watches the bytes for the
end of the first request's headers (a blank line). Later requests on a kept-alive connection are bounded
by aiohttp's `keepalive_timeout` (`--keep_alive_timeout`): an idle or half-sent next request is closed by
it. The body is bounded in http_utils.read_json (`--http_body_timeout`, and a 413 from Content-Length).
"""

import asyncio
import json

from aiohttp import web

from lightvlm.common.logging import get_logger

logger = get_logger(__name__)

HEADERS_END = (b"\r\n\r\n", b"\n\n")  # a blank line; some clients end lines with LF alone


def refusal(message: str) -> bytes:
    body = json.dumps({"message": message}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


class ConnectionGuard:
    """The protocol factory for the listening socket: one GuardedConnection per accepted connection.
    Invariant: num_open counts the connections handed to aiohttp and not yet lost."""

    def __init__(self, server: web.Server, header_timeout: float, max_connections: int):
        self.server = server
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.num_open = 0
        self.num_refused = 0

    def __call__(self) -> asyncio.Protocol:
        return GuardedConnection(self)


class GuardedConnection(asyncio.Protocol):
    """Forwards every protocol call to aiohttp's handler, after the connection cap and until the header
    deadline."""

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.handler = None  # aiohttp's RequestHandler, once the connection is admitted
        self.transport = None
        self.deadline = None  # the header timer, until the first request's headers are complete
        self.tail = b""  # the last bytes seen, to find HEADERS_END across chunks

    def connection_made(self, transport) -> None:
        self.transport = transport
        guard = self.guard
        if guard.num_open >= guard.max_connections:
            guard.num_refused += 1
            transport.write(refusal(f"the server has {guard.max_connections} connections open "
                                    f"(--max_connections); retry later"))
            transport.close()
            return
        guard.num_open += 1
        self.handler = guard.server()
        self.handler.connection_made(transport)
        self.deadline = asyncio.get_running_loop().call_later(guard.header_timeout, self.headers_too_slow)

    def headers_too_slow(self) -> None:
        self.deadline = None
        logger.debug("closing a connection whose request headers took over %.1f s (--http_header_timeout)",
                    self.guard.header_timeout)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            return
        if self.deadline is not None:
            seen = self.tail + data
            if any(end in seen for end in HEADERS_END):
                self.deadline.cancel()
                self.deadline = None
                self.tail = b""
            else:
                self.tail = seen[-3:]  # enough to complete either end with the next chunk
        self.handler.data_received(data)

    def eof_received(self):
        return self.handler.eof_received() if self.handler is not None else None

    def connection_lost(self, exc) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.handler is not None:
            self.guard.num_open -= 1
            self.handler.connection_lost(exc)
            self.handler = None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCPSite whose listening socket hands connections to a ConnectionGuard."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, header_timeout: float, max_connections: int):
        super().__init__(runner, host, port)
        self.header_timeout = header_timeout
        self.max_connections = max_connections

    async def start(self) -> None:
        self._runner._reg_site(self)  # noqa: SLF001 (what BaseSite.start does; TCPSite.start would bind its own factory)
        guard = ConnectionGuard(self._runner.server, self.header_timeout, self.max_connections)
        self._server = await asyncio.get_running_loop().create_server(
            guard, self._host, self._port, backlog=self._backlog, reuse_address=True)
