"""Sharing the machine's cores between compute processes that are rarely all busy at once.

The vision encoder works in bursts and the language model waits for it, or the other way round; with
a fixed split, half the cores idle whenever one side does. Each compute process owns one slot of a
small shared-memory table and marks itself busy while it works; before each unit of work (a model
step, an encoder batch) it sets its torch thread count to its share of the cores among the processes
busy right now. Together they never ask for more threads than there are cores, except for the
moment between one side starting and the other noticing at its next step.
"""

import contextlib
from multiprocessing import shared_memory

import numpy as np
import torch

from lightvlm.common import shm


class CpuShare:
    def __init__(self, name: str, slot: int, cores: int):
        self.segment = shm.attach(name)
        self.table = np.ndarray((self.segment.size // 4,), dtype=np.int32, buffer=self.segment.buf)
        self.slot, self.cores = slot, cores

    @staticmethod
    def create(name: str, num_slots: int) -> shared_memory.SharedMemory:
        segment = shm.create(name, 4 * num_slots)
        segment.buf[:4 * num_slots] = bytes(4 * num_slots)
        return segment

    @contextlib.contextmanager
    def working(self, parallel: bool = True):
        """`parallel=False` for work too small to gain from threads (a few decode tokens): it runs on one
        thread and leaves the other cores to the rooms that move its results along."""
        self.table[self.slot] = 1
        busy = max(1, int(self.table.sum()))
        threads = max(1, self.cores // busy) if parallel else 1
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            self.table[self.slot] = 0


def threads_for(fixed: int | None, table: str, slot: int, cores: int, device: str) -> "CpuShare | None":
    """Fixed threads when asked for (or on a GPU, where it does not matter), else a share of the table."""
    if fixed is not None or device != "cpu" or not table:
        torch.set_num_threads(fixed or 1)
        return None
    return CpuShare(table, slot, cores)


def thread_policy(share: "CpuShare | None") -> str:
    return f"threads shared among busy processes ({share.cores} cores)" if share else \
        f"{torch.get_num_threads()} threads"


def working(share: "CpuShare | None", parallel: bool = True):
    return share.working(parallel) if share is not None else contextlib.nullcontext()
