"""Configuration: environment knobs now; the server's CLI -> frozen ServerConfig lives here too.

Every room and the pipeline get their settings from here, never from a global or a raw dict.
"""

import os


def env_int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None
    if number < minimum:
        raise ValueError(f"environment variable {name}={number} must be >= {minimum}")
    return number


def load_workers() -> int:
    """LOADWORKER: threads that read safetensors shards at start-up (default 1)."""
    return env_int("LOADWORKER", 1)
