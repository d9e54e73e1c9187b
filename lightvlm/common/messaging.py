"""ZeroMQ sockets between rooms: each room binds one PULL inbox; others PUSH to it.

Messages are the dataclasses of io_struct, pickled. A batch of messages may travel as one list.
"""

import time

import zmq


class Inbox:
    def __init__(self, context: zmq.Context, endpoint: str):
        self.socket = context.socket(zmq.PULL)
        self.socket.bind(endpoint)

    def receive(self, timeout_ms: int | None) -> list:
        """Every message waiting (after up to `timeout_ms` for the first; None waits forever)."""
        messages = []
        if self.socket.poll(timeout_ms):
            messages.extend(_flatten(self.socket.recv_pyobj()))
            while self.socket.poll(0):
                messages.extend(_flatten(self.socket.recv_pyobj()))
        return messages


class Outbox:
    def __init__(self, context: zmq.Context, endpoint: str):
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, message) -> None:
        self.socket.send_pyobj(message)


def _flatten(message) -> list:
    return message if isinstance(message, list) else [message]


class StatsTimer:
    """Says when a room should send its RoomStats: on change, at most every `min_interval`, and at
    least every `heartbeat` seconds."""

    def __init__(self, min_interval: float = 0.1, heartbeat: float = 1.0):
        self.min_interval, self.heartbeat = min_interval, heartbeat
        self.last_sent, self.last_values = 0.0, None

    def due(self, values) -> bool:
        now = time.monotonic()
        changed = values != self.last_values
        if (changed and now - self.last_sent >= self.min_interval) or now - self.last_sent >= self.heartbeat:
            self.last_sent, self.last_values = now, values
            return True
        return False
