"""rpyc between a manager and its worker processes (router -> model workers, visualserver -> encoders).

Payloads cross as pickled bytes: rpyc would turn lists and dicts into slow remote proxies. Sockets set
TCP_NODELAY so a small step message is not held back by Nagle's algorithm.

A worker serves its one client (the room that drives it) on its main thread, the thread that loaded
the model. OpenMP keeps a thread pool per thread that runs parallel work; were calls served on a
connection thread, the process would hold two pools, more OpenMP threads than cores, and libgomp
would then stop spin-waiting between parallel regions: its threads sleep and wake around every op
(about 500 context switches per 300-token prefill on 2 cores, and that prefill 20-50% slower).
"""

import contextlib
import logging
import pickle
import socket
import time
from collections.abc import Callable

import rpyc
from rpyc.core.stream import SocketStream
from rpyc.utils.server import OneShotServer

PROTOCOL = {"allow_pickle": False, "sync_request_timeout": None, "allow_public_attrs": False}


class NoDelayService(rpyc.Service):
    def on_connect(self, conn):
        conn._channel.stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(service: rpyc.Service, port: int) -> None:
    """Serve `service` on loopback to one client, on this thread, until that client disconnects."""
    quiet = logging.getLogger("lightvlm.rpc")  # rpyc logs every connection at INFO
    quiet.setLevel(logging.WARNING)
    OneShotServer(service, hostname="127.0.0.1", port=port, protocol_config=PROTOCOL, logger=quiet).start()


def connect(port: int, timeout: float = 60.0) -> rpyc.Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stream = SocketStream.connect("127.0.0.1", port, nodelay=True, timeout=timeout)
            return rpyc.connect_stream(stream, config=PROTOCOL)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class WorkerGroup:
    """The same call on every rank at once; ranks run collectives together, so none may be skipped."""

    def __init__(self, ports: list[int]):
        self.conns = [connect(port) for port in ports]

    def call(self, method: str, *args) -> list:
        """Call `exposed_<method>(*args)` on all ranks concurrently; returns each rank's unpickled result."""
        return self.start(method, *args)()

    def start(self, method: str, *args) -> Callable[[], list]:
        """Send the call now, collect the results later (calling the returned function waits for them).
        Each rank serves its connection's calls one after another, in the order they were sent."""
        pending = [rpyc.async_(getattr(conn.root, method))(*args) for conn in self.conns]
        return lambda: [pickle.loads(result.value) for result in pending]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):  # the worker may already be gone
                conn.close()
