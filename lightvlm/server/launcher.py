"""The launcher: starts the rooms in order, waits for each one's "ready", and owns shutdown.

Order: first the rooms that need nobody (detokenization, model workers, encoder workers) all at once,
then their managers (router, visualserver), then the httpserver, so that once the HTTP port is open
every room behind it answers. Each room opens and checks the checkpoint itself; if one fails to
start, its report is printed, every child started so far is stopped and the launcher exits non-zero.
SIGINT or SIGTERM, or any room dying, stops everything within seconds; the private IPC folder and
every shared-memory segment of this instance are removed.
"""

import os
import signal
import sys
import time

from lightvlm.common.logging import get_logger
from lightvlm.config import ServerConfig
from lightvlm.server.detokenization.manager import start_detokenization_process
from lightvlm.server.httpserver.app import start_httpserver_process
from lightvlm.server.router.manager import start_router_process
from lightvlm.visualserver.encoder_worker import start_encoder_process
from lightvlm.visualserver.manager import start_visual_process
from lightvlm.workers.model_worker import start_worker_process
from lightvlm.workers.spawn import Instance, Interrupted, RoomFailed, Rooms

logger = get_logger("lightvlm.launcher")

STOP_GRACE_SECONDS = 5.0


class Launcher:
    def __init__(self, config: ServerConfig):
        self.instance = Instance(config, config.model.tp + config.visual.num_encoder_workers)
        self.config = self.instance.config
        self.rooms = Rooms()
        self.stopping = False

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
                return
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopping = True
        self.rooms.stop(STOP_GRACE_SECONDS)
        self.instance.close()


def launch(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM or a room's death. Returns the process exit code."""
    launcher = Launcher(config)
    config = launcher.config

    def on_signal(signum, frame):
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
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
        code = 0 if launcher.stopping else 1
    except RoomFailed as e:
        print(f"lightvlm: a room failed to start.\n{e}", file=sys.stderr, flush=True)
        code = 1
    except Interrupted:
        code = 0
    finally:
        launcher.stop()
    return code
