"""The rpyc link between a room and its worker processes: calls run on the serving thread, in order."""

import pickle
import threading
import time

import torch

from lightvlm.common.ports import free_ports
from lightvlm.common.rpc import NoDelayService, WorkerGroup, serve


class Recorder(NoDelayService):
    def __init__(self):
        self.calls = []

    def exposed_record(self, tag: str) -> bytes:
        time.sleep(0.05)  # long enough for a second call to arrive while this one runs
        torch.ones(64, 64) @ torch.ones(64, 64)  # parallel work, as a model step does
        self.calls.append((tag, threading.get_ident()))
        return pickle.dumps(tag)


def test_calls_run_on_the_serving_thread_in_the_order_sent():
    """The serving thread is the worker's main thread, the one that loaded the model: OpenMP then keeps
    one thread pool per process (see common/rpc.py). Calls started before the previous one returned
    (the router's next step) run after it, in order."""
    service, port = Recorder(), free_ports(1)[0]
    serving = threading.Thread(target=serve, args=(service, port))
    serving.start()
    group = WorkerGroup([port])
    first, second = group.start("record", "first"), group.start("record", "second")
    assert (second(), first()) == (["second"], ["first"])
    assert group.call("record", "third") == ["third"]
    assert service.calls == [(tag, serving.ident) for tag in ("first", "second", "third")]
    group.close()
    serving.join(10)
    assert not serving.is_alive()  # its one client left: the room's loop ends
