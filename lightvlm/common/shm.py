"""POSIX shared memory, and the layouts that cross processes through it: image bytes, video frames and
embedding rows. This file is their one home (names, sizes, readers and writers).

Segments are created by one process and unlinked by their owner (the creator, or the process it hands
them to) through `unlink`. Python 3.11's resource tracker would unlink a segment when a process that
touched it exits, so no segment is left registered with it: both `create` and `attach` unregister.
(Rooms started with the spawn context share one tracker, so a register from one process and an
unregister from another must balance; they do, because every process unregisters what it registered.)
The launcher sweeps whatever carries the instance prefix when the server stops. An instance's name
starts with its launcher's pid (`instance_name`), so that the next start can sweep the segments of an
instance whose launcher was killed (`sweep_dead_instances`).

Embedding rows and video frames are stored raw behind a small header (magic, dtype code, rank, shape),
never pickled; bfloat16 travels as its uint16 bits. A media segment (what the httpserver hands the
visualserver for one ImageItem) holds an image file's bytes or, behind the frames magic, a video part's
decoded frames; no image format starts with that magic, and images are checked before they get here.
"""

import os
import re
import struct
import uuid
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import torch

SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory
HEADER = struct.Struct("<4sBB6q")  # magic, dtype, ndim, up to 6 dims
MAGIC = b"LVLM"
FRAMES_MAGIC = b"LVLF"
DTYPES = {0: np.float32, 1: np.float16, 2: np.uint16, 3: np.uint8}  # uint16 carries bfloat16 bits
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def _untrack(segment: shared_memory.SharedMemory) -> None:
    resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001 (the name the tracker saw)


def create(name: str, size: int) -> shared_memory.SharedMemory:
    segment = shared_memory.SharedMemory(name=name, create=True, size=max(size, 1))
    _untrack(segment)
    return segment


def attach(name: str) -> shared_memory.SharedMemory:
    segment = shared_memory.SharedMemory(name=name)
    _untrack(segment)
    return segment


def unlink(name: str) -> None:
    """Remove a segment by name (mappings stay valid until closed); missing is fine."""
    (SHM_DIR / name).unlink(missing_ok=True)


def sweep(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with `prefix`. Returns the names removed."""
    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:
            pass
    return removed


INSTANCE_PID = re.compile(r"(\d+)x[0-9a-f]+")  # an instance name: the owner's pid, "x", a random tail


def instance_name() -> str:
    """A new instance's name: this process's pid and a random tail (so that a reused pid differs)."""
    return f"{os.getpid()}x{uuid.uuid4().hex[:6]}"


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def instance_is_dead(instance: str) -> bool:
    """Whether `instance` names an instance whose owner process is gone."""
    match = INSTANCE_PID.fullmatch(instance)
    return match is not None and not is_alive(int(match.group(1)))


def sweep_dead_instances() -> list[str]:
    """Unlink the segments of every instance whose owner is gone (a launcher killed with SIGKILL)."""
    stale = re.compile(r"lvlm([0-9a-fx]+)_")
    removed = []
    for path in SHM_DIR.glob("lvlm*_*"):
        match = stale.match(path.name)
        if match and instance_is_dead(match.group(1)):
            removed += sweep(path.name)
    return removed


# ---- image bytes: the httpserver writes them, the visualserver hands them to an encoder and unlinks ----

def bytes_segment(prefix: str, req_id: int, index: int) -> str:
    return f"{prefix}b{req_id}_{index}"


def write_bytes(name: str, data: bytes) -> None:
    """A segment holding `data`, handed to another process (which unlinks it)."""
    segment = create(name, len(data))
    segment.buf[:len(data)] = data
    segment.close()


def read_bytes(name: str, size: int) -> bytes:
    segment = attach(name)
    try:
        return bytes(segment.buf[:size])
    finally:
        segment.close()


# ---- video frames: a video part's sampled frames, uint8 [n, H, W, 3] RGB, in a media segment ----------

def frames_nbytes(num_frames: int, height: int, width: int) -> int:
    """The size of a segment holding `num_frames` RGB frames of height x width."""
    return HEADER.size + num_frames * height * width * 3


def write_media(name: str, data: bytes | np.ndarray) -> int:
    """A segment holding an image file's bytes, or video frames behind the frames header; handed to
    another process (which unlinks it). Returns its size in bytes."""
    if isinstance(data, bytes):
        write_bytes(name, data)
        return len(data)
    frames = np.ascontiguousarray(data, dtype=np.uint8)
    size = frames_nbytes(*frames.shape[:3])
    segment = create(name, size)
    try:
        HEADER.pack_into(segment.buf, 0, FRAMES_MAGIC, DTYPE_CODES[frames.dtype], frames.ndim,
                         *frames.shape, *[0] * (6 - frames.ndim))
        np.ndarray(frames.shape, dtype=np.uint8, buffer=segment.buf, offset=HEADER.size)[...] = frames
    finally:
        segment.close()
    return size


def read_media(name: str, size: int) -> bytes | np.ndarray:
    """What `write_media` stored: the image file's bytes, or a copy of the frames."""
    segment = attach(name)
    try:
        if size >= HEADER.size and bytes(segment.buf[:4]) == FRAMES_MAGIC:
            _, _, ndim, *dims = HEADER.unpack_from(segment.buf, 0)
            return np.ndarray(tuple(dims[:ndim]), dtype=np.uint8, buffer=segment.buf, offset=HEADER.size).copy()
        return bytes(segment.buf[:size])
    finally:
        segment.close()


# ---- embedding rows: the embed cache's entries, written by encoder rank 0, read by the model workers ----

def embedding_segment(prefix: str, key: str) -> str:
    """The name of the segment holding the image `key`'s embedding rows."""
    return f"{prefix}e{key}"


def embeddings_nbytes(num_rows: int, width: int, dtype: torch.dtype) -> int:
    """The one size function: a segment holding `num_rows` rows of `width` values of `dtype`."""
    return HEADER.size + num_rows * width * torch.empty((), dtype=dtype).element_size()


def write_embeddings(buf, embeds: torch.Tensor) -> None:
    """Embedding rows [rows, width] into a buffer of at least `embeddings_nbytes` bytes."""
    array = embeds.view(torch.uint16).numpy() if embeds.dtype == torch.bfloat16 else embeds.numpy()
    dims = list(array.shape) + [0] * (6 - array.ndim)
    HEADER.pack_into(buf, 0, MAGIC, DTYPE_CODES[array.dtype], array.ndim, *dims)
    if array.size:
        np.ndarray(array.shape, dtype=array.dtype, buffer=buf, offset=HEADER.size)[...] = array


def read_embeddings(buf) -> torch.Tensor:
    """A zero-copy tensor over the rows `write_embeddings` stored."""
    magic, code, ndim, *dims = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError("shared memory segment does not hold lightvlm embedding rows")
    array = np.ndarray(tuple(dims[:ndim]), dtype=DTYPES[code], buffer=buf, offset=HEADER.size)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if array.dtype == np.uint16 else tensor
