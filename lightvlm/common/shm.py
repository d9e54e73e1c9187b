"""POSIX shared memory for image bytes and image embeddings.

Segments are created by one process and unlinked by their owner (the creator, or the process it hands
them to) through `unlink`. Python 3.11's resource tracker would unlink a segment when a process that
touched it exits, so no segment is left registered with it: both `create` and `attach` unregister.
(Rooms started with the spawn context share one tracker, so a register from one process and an
unregister from another must balance; they do, because every process unregisters what it registered.)
The launcher sweeps whatever carries the instance prefix when the server stops.

Embeddings are stored raw, with a small header: magic, dtype code, rank, shape. Never pickled.
"""

import struct
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory
HEADER = struct.Struct("<4sBB6q")  # magic, dtype, ndim, up to 6 dims
MAGIC = b"LVLM"
DTYPES = {0: np.float32, 1: np.float16, 2: np.uint16, 3: np.uint8}  # uint16 carries bfloat16 bits
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def _untrack(shm: shared_memory.SharedMemory) -> None:
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 (the name the tracker saw)


def create(name: str, size: int) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name, create=True, size=max(size, 1))
    _untrack(shm)
    return shm


def attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name)
    _untrack(shm)
    return shm


def unlink(name: str) -> None:
    """Remove a segment by name (mappings stay valid until closed); missing is fine."""
    (SHM_DIR / name).unlink(missing_ok=True)


def write_bytes(name: str, data: bytes) -> None:
    """A segment holding `data`, handed to another process (which unlinks it)."""
    shm = create(name, len(data))
    shm.buf[:len(data)] = data
    shm.close()


def read_bytes(name: str, size: int) -> bytes:
    shm = attach(name)
    try:
        return bytes(shm.buf[:size])
    finally:
        shm.close()


def embedding_segment(prefix: str, key: str) -> str:
    """The name of the segment holding the image `key`'s embedding rows (the embed cache's entries)."""
    return f"{prefix}e{key}"


def array_nbytes(shape: tuple[int, ...], dtype) -> int:
    return HEADER.size + int(np.prod(shape)) * np.dtype(dtype).itemsize


def write_array_header(buf, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Write the header into `buf` and return a writable array view of the data area."""
    dims = list(shape) + [0] * (6 - len(shape))
    HEADER.pack_into(buf, 0, MAGIC, DTYPE_CODES[np.dtype(dtype)], len(shape), *dims)
    count = int(np.prod(shape))
    return np.ndarray(shape, dtype=dtype, buffer=buf, offset=HEADER.size)[...] if count else np.empty(shape, dtype)


def read_array(buf) -> np.ndarray:
    """A zero-copy view of the array stored in `buf`."""
    magic, code, ndim, *dims = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError("shared memory segment does not hold a lightvlm array")
    return np.ndarray(tuple(dims[:ndim]), dtype=DTYPES[code], buffer=buf, offset=HEADER.size)


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
