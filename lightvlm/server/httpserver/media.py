"""Images at the edge: fetch (http(s) with a timeout and a byte cap) or base64, check, hash.

Only the header is read here (format and size, checked against the pixel limit before anything is
decoded); the bytes, not pixels, go on to the visualserver, whose encoder decodes each image once.
Every problem is an ImageError with a message the client can act on, and a reason for the metrics.
"""

import asyncio
import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import aiohttp
from PIL import Image

from lightvlm.common.identity import content_digest


class ImageError(ValueError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # a short label for the images-rejected metric


@dataclass(frozen=True)
class ImageData:
    data: bytes
    width: int
    height: int
    digest: str  # MD5 of the bytes (common.identity)


@dataclass(frozen=True)
class MediaLimits:
    fetch_timeout: float
    max_bytes: int
    max_pixels: int


class MediaLoader:
    def __init__(self, limits: MediaLimits, executor=None):
        self.limits = limits
        self.executor = executor
        self.session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def load(self, kind: str, data: str) -> ImageData:
        """kind: "url" (http(s) or a data: URL) or "base64"."""
        if kind == "url" and data.startswith("data:"):
            kind, data = "base64", data.split(",", 1)[1] if "," in data else ""
        if kind == "url":
            raw = await self.fetch(data)
        elif kind == "base64":
            raw = await self._run(decode_base64, data, self.limits.max_bytes)
        else:
            raise ImageError(f"image type must be 'url' or 'base64', got {kind!r}", "bad_type")
        return await self._run(inspect_image, raw, self.limits.max_pixels)

    async def fetch(self, url: str, max_bytes: int | None = None, what: str = "image") -> bytes:
        """The body of an http(s) URL, at most `max_bytes` (default: the image limit); `what` names it in errors.
        Videos are fetched here too, so that one policy governs every URL a request names."""
        if not url.startswith(("http://", "https://")):
            raise ImageError(f"{what} URLs must be http(s) or data: URLs, got {url[:80]!r}", "bad_url")
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.limits.fetch_timeout))
        cap = self.limits.max_bytes if max_bytes is None else max_bytes
        try:
            async with self.session.get(url) as response:
                if response.status != 200:
                    raise ImageError(f"fetching {url} gave HTTP {response.status}", "fetch_failed")
                if response.content_length is not None and response.content_length > cap:
                    raise ImageError(f"{what} at {url} is {response.content_length} bytes; the limit is {cap}",
                                     "too_large")
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > cap:
                        raise ImageError(f"{what} at {url} is larger than the limit of {cap} bytes", "too_large")
        except ImageError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:  # ValueError: bad URLs
            raise ImageError(f"could not fetch {url[:200]}: {type(e).__name__} {e}".strip(), "fetch_failed") from None
        return bytes(body)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def decode_base64(data: str, max_bytes: int, what: str = "image") -> bytes:
    if len(data) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"base64 {what} is larger than the limit of {max_bytes} bytes", "too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what} data is not valid base64", "bad_base64") from None


def inspect_image(raw: bytes, max_pixels: int) -> ImageData:
    """Check the header (a known format, a size within the limit); nothing is decoded here."""
    if not raw:
        raise ImageError("image data is empty", "not_an_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has too many pixels; the limit is {max_pixels}", "too_many_pixels") from None
    except Exception:  # noqa: BLE001 (PIL raises many kinds for garbage)
        raise ImageError("image data is not a supported image (JPEG, PNG, WebP, GIF, BMP, ...)",
                         "not_an_image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                         "too_many_pixels")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})", "not_an_image")
    return ImageData(raw, width, height, content_digest(raw))
