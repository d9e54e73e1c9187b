"""The visualserver's bookkeeping, driven message by message with no encoder processes behind it."""

import uuid

import pytest
import torch
import zmq

from lightvlm.common import shm
from lightvlm.config import ModelConfig, RuntimeConfig, ServerConfig, VisualConfig
from lightvlm.io_struct import EncodeResult, GenerateReq, ImageItem, ReleaseImages, ReqError
from lightvlm.sampling_params import SamplingParams
from lightvlm.visualserver.manager import VisualManager


@pytest.fixture
def room(tmp_path):
    """A VisualManager with no replicas (jobs queue up; the test plays the encoder) and the two rooms it
    talks to replaced by sockets the test reads."""
    runtime = RuntimeConfig(instance=uuid.uuid4().hex[:8], ipc_dir=str(tmp_path))
    config = ServerConfig(model=ModelConfig("unused", "m"), runtime=runtime,
                          visual=VisualConfig(enabled=True, cache_capacity=2, dp=0))
    context = zmq.Context.instance()
    inboxes = {}
    for name in ("router", "httpserver"):
        inboxes[name] = context.socket(zmq.PULL)
        inboxes[name].bind(runtime.endpoint(name))
    manager = VisualManager(config, row_width=4, dtype=torch.float32)  # 16 bytes per row
    yield manager, inboxes
    manager.cache.clear()
    assert not list(shm.SHM_DIR.glob(runtime.shm_prefix + "*"))
    for socket in inboxes.values():
        socket.close(linger=0)
    manager.inbox.socket.close(linger=0)
    manager.results.close(linger=0)


def request(req_id, *keys):
    items = tuple(ImageItem(key, 10 * i, 4, (1, 1), f"nothing_{req_id}_{i}", 1) for i, key in enumerate(keys))
    return GenerateReq(req_id, tuple(range(40)), SamplingParams(), items)


def received(socket):
    messages = []
    while socket.poll(100):
        message = socket.recv_pyobj()
        messages.extend(message if isinstance(message, list) else [message])
    return messages


def finish(manager, key, error=None):
    job = next(j for j in manager.jobs if j.key == key)
    manager.jobs.remove(job)
    manager.busy += 1  # as if a replica had taken it
    manager.finish_batch([job], [EncodeResult(key, error, status=400 if error else 500)], 0.01)


def test_a_failed_image_never_strands_a_parked_request(room):
    manager, inboxes = room
    manager.handle(request(1, "x", "y"))  # A: X will fail, Y will encode
    finish(manager, "y")
    manager.handle(request(2, "z"))  # P1: no room (X, Y held by A): parked
    manager.handle(request(3, "x"))  # B: parked behind P1
    assert [r.req_id for r in manager.parked] == [2, 3]
    finish(manager, "x", error="the image could not be decoded")
    errors = [m for m in received(inboxes["httpserver"]) if isinstance(m, ReqError)]
    assert [e.req_id for e in errors] == [1]
    assert not manager.parked
    assert {j.key for j in manager.jobs} == {"z", "x"}  # B's X is encoded again from B's own bytes
    finish(manager, "z")
    finish(manager, "x")
    assert {m.req_id for m in received(inboxes["router"])} == {2, 3}


def test_duplicate_images_in_one_request_take_one_reference(room):
    manager, inboxes = room
    manager.handle(request(1, "x", "x"))
    finish(manager, "x")
    assert manager.cache.entries["x"].refs == 1
    manager.handle(request(2, "x"))
    assert manager.cache.entries["x"].refs == 2
    manager.handle(ReleaseImages(("x",)))  # what the router sends when request 1 ends
    assert manager.cache.entries["x"].refs == 1
    assert [m.req_id for m in received(inboxes["router"])] == [1, 2]


def test_a_request_larger_than_the_cache_is_refused(room):
    manager, inboxes = room
    manager.handle(request(1, "a", "b", "c"))
    errors = received(inboxes["httpserver"])
    assert errors[0].status == 400 and "3 distinct images but the cache holds 2" in errors[0].message
    assert not manager.pending and not manager.parked and len(manager.cache) == 0
