"""What every room process does around its own work: logging, dying with the parent, a readiness
handshake with the launcher, and one top-level handler that turns a crash into a report.

A room's entry calls `run_room(name, pipe, log_level, start)`. `start()` builds the room (loads models,
binds sockets) and returns its loop; once it returns, "ready" goes up the pipe and the loop runs. If
`start()` raises, the traceback goes up the pipe instead and the process exits non-zero.
"""

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from tqdm import tqdm

from lightvlm.common.logging import get_logger, setup_logging

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def die_with_parent(name: str) -> None:
    """Ask Linux to SIGTERM this process if the launcher dies, so no room outlives the server; and
    name the process after its room, so `ps` and `top` say which room is which."""
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        libc.prctl(PR_SET_NAME, f"lvlm-{name}"[:15].encode())


def run_room(name: str, pipe, log_level: str, start: Callable[[], Callable[[], None]]) -> None:
    setup_logging(log_level, name)
    die_with_parent(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns Ctrl-C and stops us with SIGTERM
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind: finally blocks release resources
    # tqdm's default lock is a multiprocessing semaphore that os._exit below would leave to the resource
    # tracker ("leaked semaphore objects" at shutdown); the loading bars need only a thread lock
    tqdm.set_lock(threading.RLock())
    logger = get_logger(f"lightvlm.{name}")
    try:
        loop = start()
    except BaseException:
        pipe.send(("error", f"{name} failed to start:\n{traceback.format_exc()}"))
        pipe.close()
        os._exit(1)
    pipe.send(("ready", name))
    pipe.close()
    code = 0
    try:
        loop()
    except SystemExit:
        pass  # SIGTERM: the loop's finally blocks have released what the room held
    except BaseException:
        logger.error("%s crashed:\n%s", name, traceback.format_exc())
        code = 1
    # Skip the interpreter's own teardown: collecting torch's and transformers' objects takes seconds
    # when every room does it at once, and there is nothing left in them to save.
    logging.shutdown()
    os._exit(code)
