"""Starting worker processes and knowing when they are ready: what both shells need (the server's
launcher for every room, the pipeline for its tensor-parallel model workers).

A child's entry function reports "ready" (or its error) up a pipe (common/process.py `run_room`);
`Rooms.wait_ready` reads those reports. `Instance` is what one server or pipeline instance owns
outside its processes: a private IPC folder, the free ports its rooms meet on, the shared-memory
table that shares the cores, and every shared-memory segment carrying its prefix.
"""

import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lightvlm.common import shm
from lightvlm.common.cpu_share import CpuShare
from lightvlm.common.logging import get_logger
from lightvlm.common.ports import free_ports
from lightvlm.config import RuntimeConfig, ServerConfig

logger = get_logger(__name__)

START_TIMEOUT_SECONDS = 600.0
# OpenMP threads that finish a parallel region spin this long (libgomp counts) before they sleep. Its
# default (300,000) is made for a process that owns the cores; the rooms share them, and a model
# worker's idle threads spinning through the other rooms' turns cost W1 10-15% of its throughput on
# 2 cores (docs/performance.md). 20,000 keeps a decode step's back-to-back regions hot.
OMP_SPIN_COUNT = "20000"


def room_environment(env) -> dict[str, str]:
    """The variables a room adds to the environment it inherits: none the user set."""
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return {}
    return {"GOMP_SPINCOUNT": OMP_SPIN_COUNT}


class RoomFailed(RuntimeError):
    pass


class Interrupted(RuntimeError):
    pass


class Rooms:
    """Child processes started with the spawn context, each reporting its readiness up a pipe."""

    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.children: list[tuple[str, mp.Process]] = []

    def start(self, name: str, target, *args) -> tuple:
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=target, args=(*args, writer), name=name, daemon=False)
        added = room_environment(os.environ)
        os.environ.update(added)  # the spawned child copies the environment as it starts; this one keeps its own
        try:
            process.start()
        finally:
            for key in added:
                del os.environ[key]
        writer.close()
        self.children.append((name, process))
        return name, process, reader

    def wait_ready(self, started: list[tuple], should_stop=lambda: False) -> None:
        """Until each of `started` said ready, watching all at once. Raises RoomFailed with the error of
        the first one that fails (often the one that checks what the user must fix)."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        waiting = list(started)
        while waiting:
            if should_stop():
                raise Interrupted("stopped by a signal while starting")
            for room in [r for r in waiting if r[2].poll()]:
                name, process, reader = room
                try:
                    status, detail = reader.recv()
                except EOFError:
                    raise RoomFailed(f"{name} exited before it was ready (code {process.exitcode})") from None
                if status != "ready":
                    raise RoomFailed(detail)
                waiting.remove(room)
            for name, process, reader in waiting:
                if not process.is_alive() and not reader.poll():
                    raise RoomFailed(f"{name} exited with code {process.exitcode} before it was ready")
            if time.monotonic() > deadline:
                raise RoomFailed(f"{', '.join(r[0] for r in waiting)} not ready after {START_TIMEOUT_SECONDS:.0f} s")
            if waiting:
                mp.connection.wait([r[2] for r in waiting], timeout=0.2)

    def first_dead(self) -> tuple[str, int] | None:
        return next(((name, p.exitcode) for name, p in self.children if not p.is_alive()), None)

    def stop(self, grace_seconds: float, last: mp.Process | None = None) -> None:
        """SIGTERM everyone (the last started first), then SIGKILL whoever is left after the grace period;
        `last` (the httpserver answering 503 meanwhile) only once all the others are gone."""
        first = [(name, p) for name, p in self.children if p is not last]
        for group in (first, [(name, p) for name, p in self.children if p is last]):
            for _, process in reversed(group):
                if process.is_alive():
                    process.terminate()
            deadline = time.monotonic() + grace_seconds
            for _, process in group:
                process.join(max(0.0, deadline - time.monotonic()))
            for name, process in group:
                if process.is_alive():
                    logger.warning("%s did not stop in %.0f s; killing it", name, grace_seconds)
                    process.kill()
                    process.join(1.0)


IPC_DIR_PREFIX = "lightvlm-"  # + the instance name + "-" + a random tail, in the temp folder


def remove_dead_instances() -> None:
    """What instances whose owner was killed (SIGKILL: no `close`) left: segments and IPC folders."""
    removed = shm.sweep_dead_instances()
    for folder in Path(tempfile.gettempdir()).glob(f"{IPC_DIR_PREFIX}*-*"):
        instance = folder.name.removeprefix(IPC_DIR_PREFIX).split("-")[0]
        if folder.is_dir() and shm.instance_is_dead(instance):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        logger.info("removed what dead instances left: %s", ", ".join(sorted(removed)))


class Instance:
    """Resources of one instance outside its processes; `close` removes them all."""

    def __init__(self, config: ServerConfig, num_compute_processes: int):
        remove_dead_instances()
        visual = config.visual.num_encoder_workers
        ports = free_ports(config.model.tp + visual + 1 + config.visual.dp)
        instance = shm.instance_name()
        runtime = RuntimeConfig(
            instance=instance,
            ipc_dir=tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{instance}-"),
            worker_ports=tuple(ports[:config.model.tp]),
            visual_ports=tuple(ports[config.model.tp:config.model.tp + visual]),
            dist_port=ports[config.model.tp + visual],
            visual_dist_ports=tuple(ports[config.model.tp + visual + 1:]),
        )
        runtime = replace(runtime, cpu_share=runtime.shm_prefix + "cpu")
        self.config = config.with_runtime(runtime)
        self.cpu_table = CpuShare.create(runtime.cpu_share, num_compute_processes)

    def close(self) -> None:
        runtime = self.config.runtime
        self.cpu_table.close()
        shm.unlink(runtime.cpu_share)
        removed = shm.sweep(runtime.shm_prefix)
        if removed:
            logger.info("removed %d leftover shared-memory segment(s)", len(removed))
        shutil.rmtree(runtime.ipc_dir, ignore_errors=True)
