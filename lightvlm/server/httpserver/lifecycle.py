"""How the httpserver stops, so that every request gets an answer.

- SIGTERM (sent by the launcher on SIGTERM/SIGINT): drain. New API requests get 503 at once and the
  probes say so; running requests get `--graceful_shutdown_timeout` seconds to finish; whatever is left
  is then failed with a 503 `ReqError`, which each face turns into its own error (a 503 JSON body, the
  native stream's error event, or the OpenAI stream's `{"error": ...}` chunk and `[DONE]`); then the
  event loop stops and the room exits.
- SIGUSR1 (sent by the launcher when another room died): fail every request at once, the same way,
  and answer 503 on every route until the launcher stops this room last, and for at least
  `DOWN_HOLD_SECONDS` (a health probe sees the 503 rather than a refused connection). The launcher
  writes the reason into `DOWN_FILE` in the IPC folder before the signal.
- If the launcher itself is gone (SIGTERM from PR_SET_PDEATHSIG), there is nobody left to finish the
  requests: no grace period.
"""

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from aiohttp import web

from lightvlm.common.logging import get_logger

logger = get_logger(__name__)

DOWN_FILE = "down"  # in the IPC folder: why the launcher is stopping the server (a room died)
FLUSH_SECONDS = 3.0  # after failing the rest: time for the handlers to write their error and return
DOWN_HOLD_SECONDS = 2.0  # after a room died: answer 503 at least this long, so probes see it, not a refusal
PROBES = ("/health", "/liveness", "/readiness", "/metrics")  # answered while stopping


class Lifecycle:
    """Counts the API requests being handled, refuses new ones once stopping, and fails the rest."""

    def __init__(self, manager, grace_seconds: float, ipc_dir: str, error_response):
        self.manager = manager
        self.error_response = error_response  # (request, status, message) -> the face's JSON error
        self.grace_seconds = grace_seconds
        self.ipc_dir = ipc_dir
        self.parent = os.getppid()
        self.reason: str | None = None  # set once stopping: what 503 answers say
        self.is_draining = False
        self.num_active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.drainer: asyncio.Task | None = None
        self.down_at: float | None = None  # loop time of the SIGUSR1 (a room died)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        loop.add_signal_handler(signal.SIGUSR1, self.on_room_down)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.path in PROBES:
            return await handler(request)
        if self.reason is not None:
            return self.error_response(request, 503, self.reason)
        self.num_active += 1
        self.idle.clear()
        try:
            return await handler(request)
        finally:
            self.num_active -= 1
            if self.num_active == 0:
                self.idle.set()

    def health(self) -> str | None:
        """Why /health and /readiness answer 503 now, or None."""
        if self.reason is None:
            return None
        if self.is_draining and self.drainer is not None and not self.drainer.done():
            return f"draining: {self.reason}; {self.num_active} request(s) still running"
        return self.reason

    # -- the two ways to stop --------------------------------------------------------------------

    def on_sigterm(self) -> None:
        if self.drainer is not None:
            return
        grace = self.grace_seconds if os.getppid() == self.parent else 0.0
        if self.reason is None:
            self.reason = "the server is shutting down and takes no new requests"
            self.is_draining = True
        logger.info("SIGTERM: draining %d request(s) for up to %.0f s", self.num_active, grace)
        self.drainer = asyncio.get_running_loop().create_task(self.drain(grace))

    def on_room_down(self) -> None:
        try:
            detail = (Path(self.ipc_dir) / DOWN_FILE).read_text().strip()
        except OSError:
            detail = "a room of the server stopped"
        self.reason = f"{detail}; the server is shutting down"
        self.is_draining = False
        self.down_at = asyncio.get_running_loop().time()
        logger.error("%s: failing %d request(s)", detail, len(self.manager.states))
        self.manager.fail_all(503, self.reason)

    async def drain(self, grace: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), grace)
        if self.num_active:
            logger.warning("%d request(s) still running after %.0f s: ending them", self.num_active, grace)
            self.manager.fail_all(503, f"the server is shutting down: the request did not finish within the "
                                       f"grace period of {grace:.0f} s (--graceful_shutdown_timeout)")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), FLUSH_SECONDS)
        loop = asyncio.get_running_loop()
        if self.down_at is not None and os.getppid() == self.parent:
            await asyncio.sleep(max(0.0, self.down_at + DOWN_HOLD_SECONDS - loop.time()))
        loop.stop()
