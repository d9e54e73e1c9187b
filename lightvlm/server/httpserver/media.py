"""Images at the edge: fetch (http(s) under the media policy, with a deadline and a byte cap) or base64,
check, hash.

The policy (vLLM's and LMDeploy's guards as the bar): http(s) only, no credentials in the URL, the host
on `--allowed_media_domains` when that list is given, and every address the host resolves to global
unless `--allow_private_media_urls`. The resolver filters the addresses and the connection goes to one
it returned, so no second DNS lookup can be raced; redirects are followed by hand, at most 3, each hop
checked again. `file://` only under `--allowed_local_media_path`. A refused URL says why (that depends on
the URL alone); every failure to fetch says the same thing, the detail goes to the server log, so that
the server cannot be used to learn what listens behind an address.

Only the header is read here (format and size, checked against the pixel limit before anything is
decoded); the bytes, not pixels, go on to the visualserver, whose encoder decodes each image once.
Every problem is an ImageError with a message the client can act on, and a reason for the metrics.
"""

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
import warnings
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from PIL import Image

from lightvlm.common.identity import content_digest
from lightvlm.common.logging import get_logger
from lightvlm.models.processor import exif_orientation

logger = get_logger(__name__)

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class ImageError(ValueError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # a short label for the images-rejected metric


class AddressRefused(OSError):
    """The resolver found only non-global addresses for a host (an OSError, so aiohttp passes it on)."""


@dataclass(frozen=True)
class ImageData:
    data: bytes
    width: int  # as the model sees it: after the EXIF orientation
    height: int
    digest: str  # MD5 of the bytes (common.identity)


@dataclass(frozen=True)
class MediaLimits:
    fetch_timeout: float  # one URL, every redirect hop included
    max_bytes: int
    max_pixels: int
    allow_private: bool = False
    allowed_domains: tuple[str, ...] = ()  # empty: any host
    local_path: str | None = None  # file:// URLs only below this folder; None: none
    max_connections: int = 64  # the fetch pool all requests share (a request holds a few of them at most)


def is_public_address(host: str) -> bool:
    """Whether an IP address is one the media fetcher may connect to: global, and not multicast,
    reserved or unspecified, also where an IPv6 address carries an IPv4 one (mapped, 6to4, Teredo,
    NAT64)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return is_public_address(str(ip.ipv4_mapped))
    if ip.version == 6:
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


class PublicResolver(AbstractResolver):
    """The system resolver, keeping only the addresses `is_public_address` allows."""

    def __init__(self):
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        found = await self.inner.resolve(host, port, family)
        public = [result for result in found if is_public_address(result["host"])]
        if not public:
            raise AddressRefused(f"{host} resolves to no global address ({', '.join(r['host'] for r in found)})")
        return public

    async def close(self) -> None:
        await self.inner.close()


def fetch_failed(what: str, reason: str = "fetch_failed") -> ImageError:
    """The one answer for a URL that was refused or could not be fetched (the server log says which)."""
    return ImageError(f"could not fetch the {what} URL", reason)


def refusal(url: str, limits: MediaLimits) -> str | None:
    """Why the policy refuses a well-formed http(s) URL (decided from the URL alone), or None."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    if parts.username is not None or parts.password is not None:
        return "the URL carries credentials"
    if limits.allowed_domains and host not in limits.allowed_domains:
        return f"{host!r} is not in --allowed_media_domains"
    if not limits.allow_private and is_ip_literal(host) and not is_public_address(host):
        return f"{host} is not a global address (--allow_private_media_urls allows it)"
    return None


def check_url(url: str, limits: MediaLimits, what: str = "image") -> None:
    """Refuse a URL the policy does not allow: a malformed one says so, a refused one gets the answer
    every fetch failure gets."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageError(f"{what} URLs must be http(s) or data: URLs, got {url[:80]!r}", "bad_url")
    if not parts.hostname:
        raise ImageError(f"{what} URL has no host: {url[:80]!r}", "bad_url")
    reason = refusal(url, limits)
    if reason is not None:
        logger.warning("refused %s: %s", url[:200], reason)
        raise fetch_failed(what, "url_refused")


def read_local(url: str, root: str | None, cap: int, what: str) -> bytes:
    """A file:// URL's bytes, from below `root` only."""
    if root is None:
        raise ImageError(f"file:// {what} URLs are refused (the server was started without "
                         "--allowed_local_media_path)", "url_refused")
    parts = urlsplit(url)
    path = os.path.realpath(unquote(parts.path))
    try:
        if parts.netloc not in ("", "localhost") or os.path.commonpath([path, root]) != root:
            raise OSError("not below --allowed_local_media_path")
        with open(path, "rb") as f:
            if not os.path.isfile(path) or os.fstat(f.fileno()).st_size > cap:
                raise OSError(f"not a regular file of at most {cap} bytes")
            return f.read()
    except OSError as e:
        logger.warning("reading %s (%s) failed: %s", url[:200], path, e)
        raise fetch_failed(what) from None


class FetchFailed(Exception):
    """A fetch went wrong for a reason only the log may hear."""


class MediaLoader:
    def __init__(self, limits: MediaLimits, executor=None):
        self.limits = limits
        self.executor = executor
        self.session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def load(self, kind: str, data: str) -> ImageData:
        """kind: "url" (http(s), file:// or a data: URL) or "base64"."""
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
        """The body of a URL the policy allows, at most `max_bytes` (default: the image limit); `what`
        names it in errors. Videos are fetched here too, so that one policy governs every URL a request names."""
        cap = self.limits.max_bytes if max_bytes is None else max_bytes
        if url.startswith("file:"):
            return await self._run(read_local, url, self.limits.local_path, cap, what)
        try:
            async with asyncio.timeout(self.limits.fetch_timeout):
                return await self._follow(url, cap, what)
        except ImageError:
            raise
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, AddressRefused):
                logger.warning("refused %s: %s", url[:200], e.os_error)
                raise fetch_failed(what, "url_refused") from None
            detail = e
        except (FetchFailed, aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:  # ValueError: bad URLs
            detail = e
        logger.warning("fetching %s failed: %s %s", url[:200], type(detail).__name__, detail)
        raise fetch_failed(what)

    async def _follow(self, url: str, cap: int, what: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, self.limits, what)
            async with self._session().get(url, allow_redirects=False) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    url = urljoin(url, response.headers["Location"])
                    continue
                if response.status != 200:
                    raise FetchFailed(f"HTTP {response.status}")
                if response.content_length is not None and response.content_length > cap:
                    raise FetchFailed(f"{response.content_length} bytes; the limit is {cap}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > cap:
                        raise FetchFailed(f"more than the limit of {cap} bytes")
                return bytes(body)
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            resolver = None if self.limits.allow_private else PublicResolver()
            connector = aiohttp.TCPConnector(limit=self.limits.max_connections, resolver=resolver)
            self.session = aiohttp.ClientSession(connector=connector)
        return self.session

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
    """Check the header (a known format, a size within the limit); nothing is decoded here. The size
    is the one the model sees: turned as the EXIF orientation says (as the decode does; 5-8 turn it a
    quarter, so width and height swap)."""
    if not raw:
        raise ImageError("image data is empty", "not_an_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))  # reads the header only
            width, height = image.size
            if exif_orientation(image) in (5, 6, 7, 8):
                width, height = height, width
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has too many pixels; the limit is {max_pixels}", "too_many_pixels") from None
    except Exception:  # noqa: BLE001 (PIL raises many kinds for garbage)
        raise ImageError("image data is not a supported image (JPEG, PNG, WebP, GIF, BMP, ...)",
                         "not_an_image") from None
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                         "too_many_pixels")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})", "not_an_image")
    return ImageData(raw, width, height, content_digest(raw))
