"""An image's identity, the same in both shells: its cache key and the ids its placeholder rows carry.

The key hashes the image's bytes with everything that shapes its embedding: the processor's
preprocessing settings and the image's grid (tiling, or resolution for dynamic-resolution families),
so that the same bytes at another resolution are another image. The placeholder ids derive from 64
bits of the key, far above any vocabulary, so that anything keyed by token ids (the prefix cache)
tells different images apart and shares identical ones. They never reach an embedding table: the
model runner replaces those rows with the image's embedding rows.
"""

import hashlib

IMAGE_ID_BASE = 1 << 40  # above every vocabulary; ids here are Python ints, never tensors


def content_digest(data: bytes) -> str:
    """MD5 of an image file's bytes (computed once per image where the bytes arrive)."""
    return hashlib.md5(data).hexdigest()


def image_key(digest: str, settings: str, grid: tuple[int, ...]) -> str:
    return hashlib.md5(f"{digest}|{settings}|{grid}".encode()).hexdigest()


def placeholder_id(key: str) -> int:
    """The id every embedding row of the image `key` carries in the prompt: 64 bits of the key."""
    return IMAGE_ID_BASE + int(key[:16], 16)


def is_placeholder(token_id: int) -> bool:
    return token_id >= IMAGE_ID_BASE



def video_part_key(digest: str, frame_indices: tuple[int, ...], fps: float | None, settings: str,
                   grid: tuple[int, ...]) -> str:
    """A part of a video (a span of its rows: all its frames, a temporal patch, or one frame): the video's
    bytes, which of its frames the part is made of (what the sampling chose) and the rate they count in
    (which places them in time), the frame settings and the grid. The same frames of the same video are
    the same part whatever sampling asked for them."""
    frames = ",".join(map(str, frame_indices))
    return image_key(f"{digest}|video frames {frames} at {fps} fps", settings, grid)
