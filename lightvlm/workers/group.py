"""A handle on the model workers: one rpyc connection per tensor-parallel rank (the server's router
and the tp > 1 pipeline drive them the same way)."""

import pickle
from collections.abc import Callable

from lightvlm.common.rpc import WorkerGroup
from lightvlm.io_struct import StepInput, StepOutput


class ModelWorkers:
    def __init__(self, ports: list[int]):
        self.group = WorkerGroup(ports)

    def num_slots(self) -> int:
        return min(info["num_slots"] for info in self.group.call("info"))

    def step(self, step: StepInput) -> StepOutput:
        """Every rank runs the step; rank 0's answer carries the sampled tokens."""
        return self.launch(step)()

    def launch(self, step: StepInput) -> Callable[[], StepOutput]:
        """Start the step on every rank; the returned function waits for its output."""
        results = self.group.start("step", pickle.dumps(step))
        return lambda: results()[0]

    def close(self) -> None:
        self.group.close()
