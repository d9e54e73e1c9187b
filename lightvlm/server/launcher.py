"""The launcher: starts the rooms in order, waits for each one's "ready", and owns shutdown.

Order: first the rooms that need nobody (detokenization, model workers, encoder workers) all at once,
then their managers (router, visualserver), then the httpserver, so that once the HTTP port is open
every room behind it answers.
If a room fails to start, its traceback is printed, every child started so far is stopped and the
launcher exits non-zero. SIGINT or SIGTERM, or any room dying, stops everything within seconds; the
private IPC folder and every shared-memory segment of this instance are removed.
"""

import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import replace

from lightvlm.common import shm
from lightvlm.common.cpu_share import CpuShare
from lightvlm.common.logging import get_logger
from lightvlm.common.ports import free_ports
from lightvlm.config import RuntimeConfig, ServerConfig
from lightvlm.server.detokenization.manager import start_detokenization_process
from lightvlm.server.httpserver.app import start_httpserver_process
from lightvlm.server.router.manager import start_router_process
from lightvlm.server.worker.rpc_service import start_worker_process
from lightvlm.visualserver.encoder_worker import start_encoder_process
from lightvlm.visualserver.manager import start_visual_process

logger = get_logger("lightvlm.launcher")

STOP_GRACE_SECONDS = 5.0
START_TIMEOUT_SECONDS = 600.0


class RoomFailed(RuntimeError):
    pass


class Interrupted(RuntimeError):
    pass


def with_runtime(config: ServerConfig) -> ServerConfig:
    visual = config.visual.num_encoder_workers
    ports = free_ports(config.model.tp + visual + 1 + config.visual.dp)
    runtime = RuntimeConfig(
        instance=uuid.uuid4().hex[:8],
        ipc_dir=tempfile.mkdtemp(prefix="lightvlm-"),
        worker_ports=tuple(ports[:config.model.tp]),
        visual_ports=tuple(ports[config.model.tp:config.model.tp + visual]),
        dist_port=ports[config.model.tp + visual],
        visual_dist_ports=tuple(ports[config.model.tp + visual + 1:]),
    )
    runtime = replace(runtime, cpu_share=runtime.shm_prefix + "cpu")
    return config.with_runtime(runtime)


class Launcher:
    def __init__(self, config: ServerConfig, row_bytes: int):
        self.config = config
        self.row_bytes = row_bytes  # bytes of one image-embedding row in the cache
        self.ctx = mp.get_context("spawn")
        self.children: list[tuple[str, mp.Process]] = []
        self.stopping = False
        self.cpu_table = CpuShare.create(config.runtime.cpu_share, config.model.tp + config.visual.num_encoder_workers)

    def start_room(self, name: str, target, *args) -> tuple:
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=target, args=(*args, writer), name=name, daemon=False)
        process.start()
        writer.close()
        self.children.append((name, process))
        return name, process, reader

    def wait_ready(self, started: list[tuple]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for name, process, reader in started:
            while not reader.poll(0.2):
                if self.stopping:
                    raise Interrupted("stopped by a signal while starting")
                if not process.is_alive():
                    raise RoomFailed(f"{name} exited with code {process.exitcode} before it was ready")
                if time.monotonic() > deadline:
                    raise RoomFailed(f"{name} was not ready after {START_TIMEOUT_SECONDS:.0f} s")
            try:
                status, detail = reader.recv()
            except EOFError:
                raise RoomFailed(f"{name} exited before it was ready (code {process.exitcode})") from None
            if status != "ready":
                raise RoomFailed(detail)

    def start(self) -> None:
        config, visual = self.config, self.config.visual
        first = [self.start_room("detokenization", start_detokenization_process, config)]
        first += [self.start_room(f"worker{r}", start_worker_process, config, r) for r in range(config.model.tp)]
        if visual.enabled:
            first += [self.start_room(f"encoder{d}.{r}", start_encoder_process, config, d, r)
                      for d in range(visual.dp) for r in range(visual.tp)]
        self.wait_ready(first)
        managers = [self.start_room("router", start_router_process, config)]
        if visual.enabled:
            managers.append(self.start_room("visualserver", start_visual_process, config, self.row_bytes))
        self.wait_ready(managers)
        self.wait_ready([self.start_room("httpserver", start_httpserver_process, config)])

    def watch(self) -> None:
        """Until a signal or a room's death: then stop everything."""
        while not self.stopping:
            for name, process in self.children:
                if not process.is_alive():
                    logger.error("%s exited with code %s; stopping the server", name, process.exitcode)
                    return
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopping = True
        for _, process in reversed(self.children):
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for _, process in self.children:
            process.join(max(0.0, deadline - time.monotonic()))
        for name, process in self.children:
            if process.is_alive():
                logger.warning("%s did not stop in %.0f s; killing it", name, STOP_GRACE_SECONDS)
                process.kill()
                process.join(1.0)
        self.cpu_table.close()
        shm.unlink(self.config.runtime.cpu_share)
        removed = shm.sweep(self.config.runtime.shm_prefix)
        if removed:
            logger.info("removed %d leftover shared-memory segment(s)", len(removed))
        shutil.rmtree(self.config.runtime.ipc_dir, ignore_errors=True)


def launch(config: ServerConfig, row_bytes: int) -> int:
    """Run the server until SIGINT/SIGTERM or a room's death. Returns the process exit code."""
    config = with_runtime(config)
    launcher = Launcher(config, row_bytes)

    def on_signal(signum, frame):
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    logger.info("instance %s, IPC folder %s", config.runtime.instance, config.runtime.ipc_dir)
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

