"""The launcher: starts the rooms in order, waits for each one's "ready", and owns shutdown.

Order: first the rooms that need nobody (detokenization, model workers, encoder workers) all at once,
then their managers (router, visualserver), then the httpserver, so that once the HTTP port is open
every room behind it answers. Each room opens and checks the checkpoint itself; if one fails to
start, its report is printed, every child started so far is stopped and the launcher exits non-zero.
Stopping (see httpserver/lifecycle.py for the httpserver's side): on SIGINT or SIGTERM the httpserver
is asked to drain first (SIGTERM: 503 for new requests, `--graceful_shutdown_timeout` seconds for the
running ones, an error for the rest) while every other room keeps serving it; then the other rooms are
stopped. When a room dies, the httpserver is told at once (SIGUSR1: every request fails with a 503,
every route answers 503), the other rooms are stopped, the httpserver last, and the launcher exits
non-zero. Either way the private IPC folder and every shared-memory segment of this instance are
removed. A second signal ends the drain at once. Rooms die with the launcher (PR_SET_PDEATHSIG), and
the next start removes what a killed launcher left (workers/spawn.py `remove_dead_instances`).
"""

import os
import signal
import sys
import time
from pathlib import Path

from lightvlm.common.logging import get_logger
from lightvlm.config import ServerConfig
from lightvlm.server.detokenization.manager import start_detokenization_process
from lightvlm.server.httpserver.app import start_httpserver_process
from lightvlm.server.httpserver.lifecycle import DOWN_FILE
from lightvlm.server.router.manager import start_router_process
from lightvlm.visualserver.encoder_worker import start_encoder_process
from lightvlm.visualserver.manager import start_visual_process
from lightvlm.workers.model_worker import start_worker_process
from lightvlm.workers.spawn import Instance, Interrupted, RoomFailed, Rooms

logger = get_logger("lightvlm.launcher")

STOP_GRACE_SECONDS = 5.0  # for rooms other than a draining httpserver
DRAIN_MARGIN_SECONDS = 10.0  # past --graceful_shutdown_timeout, before a draining httpserver is killed


class Launcher:
    def __init__(self, config: ServerConfig):
        self.instance = Instance(config, config.model.tp + config.visual.num_encoder_workers)
        self.config = self.instance.config
        self.rooms = Rooms()
        self.stopping = False
        self.hurry = False  # a second signal: end the drain now
        self.told_down = False  # the httpserver was told to fail everything now
        self.room_died = False  # while draining: the exit code is then 1

    def start(self) -> None:
        config, visual, rooms = self.config, self.config.visual, self.rooms
        first = [rooms.start("detokenization", start_detokenization_process, config)]
        first += [rooms.start(f"worker{r}", start_worker_process, config, r) for r in range(config.model.tp)]
        if visual.enabled:
            first += [rooms.start(f"encoder{d}.{r}", start_encoder_process, config, d, r)
                      for d in range(visual.dp) for r in range(visual.tp)]
        self.wait_ready(first)
        managers = [rooms.start("router", start_router_process, config)]
        if visual.enabled:
            managers.append(rooms.start("visualserver", start_visual_process, config))
        self.wait_ready(managers)
        self.wait_ready([rooms.start("httpserver", start_httpserver_process, config)])

    def wait_ready(self, started: list[tuple]) -> None:
        self.rooms.wait_ready(started, should_stop=lambda: self.stopping)

    def watch(self) -> None:
        """Until a signal or a room's death: then stop everything."""
        while not self.stopping:
            dead = self.rooms.first_dead()
            if dead is not None:
                logger.error("%s exited with code %s; stopping the server", *dead)
                self.tell_down(f"the {dead[0]} room exited with code {dead[1]}")
                return
            time.sleep(0.2)

    def httpserver(self):
        return next((p for name, p in self.rooms.children if name == "httpserver"), None)

    def tell_down(self, reason: str) -> None:
        """Make the httpserver fail every request now and answer 503 until it is stopped."""
        http = self.httpserver()
        if self.told_down or http is None or not http.is_alive():
            return
        self.told_down = True
        (Path(self.config.runtime.ipc_dir) / DOWN_FILE).write_text(reason)
        os.kill(http.pid, signal.SIGUSR1)

    def drain(self) -> None:
        """SIGTERM the httpserver and wait while it drains, the other rooms still serving it."""
        http = self.httpserver()
        if http is None or not http.is_alive():
            return
        http.terminate()
        limit = self.config.graceful_shutdown_timeout + DRAIN_MARGIN_SECONDS
        deadline = time.monotonic() + limit
        while http.is_alive() and time.monotonic() < deadline:
            dead = next(((n, p.exitcode) for n, p in self.rooms.children if n != "httpserver" and not p.is_alive()),
                        None)
            if dead is not None:
                logger.error("%s exited with code %s while the httpserver drained", *dead)
                self.room_died = True
                self.tell_down(f"the {dead[0]} room exited with code {dead[1]}")
            elif self.hurry:
                self.tell_down("the server was asked to stop at once")
            if self.told_down:
                return  # the httpserver failed everything; it stops last
            http.join(0.1)
        if http.is_alive():
            logger.warning("the httpserver did not drain in %.0f s; killing it", limit)
            http.kill()
            http.join(1.0)

    def stop(self, drain: bool) -> None:
        """Drain (after a signal) or not (a room died), stop every room but the httpserver, then it."""
        self.stopping = True
        if drain:
            self.drain()
        http = self.httpserver()
        self.rooms.stop(STOP_GRACE_SECONDS, last=http)
        self.instance.close()


def launch(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM or a room's death. Returns the process exit code."""
    launcher = Launcher(config)
    config = launcher.config

    def on_signal(signum, frame):
        launcher.hurry = launcher.stopping
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code, drain = 0, False
    logger.info("instance %s, IPC folder %s", config.runtime.instance, config.runtime.ipc_dir)
    if config.model.trust_remote_code:
        logger.info("--trust_remote_code is accepted for compatibility; lightvlm never runs checkpoint code")
    if config.model.device == "cuda" and config.visual.enabled and config.visual.num_encoder_workers != config.model.tp:
        logger.warning("visual_dp x visual_tp (%d) differs from tp (%d): GPU memory will be used unevenly",
                       config.visual.num_encoder_workers, config.model.tp)
    try:
        launcher.start()
        logger.info("lightvlm is serving %s on http://%s:%d (pid %d)", config.model.model_name, config.http.host,
                    config.http.port, os.getpid())
        launcher.watch()
        code, drain = (0, True) if launcher.stopping else (1, False)
    except RoomFailed as e:
        print(f"lightvlm: a room failed to start.\n{e}", file=sys.stderr, flush=True)
        code = 1
    except Interrupted:
        code = 0
    finally:
        launcher.stop(drain)
    return 1 if launcher.room_died else code
