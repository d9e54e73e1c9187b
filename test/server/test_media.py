"""The media policy (httpserver/media.py): which URLs are fetched, redirects, file:// and EXIF.

The address classifier is tested as a unit on written-out addresses; everything that connects talks to a
loopback HTTP server of the test's own, which counts what reaches it.
"""

import asyncio
import contextlib
import http.server
import io
import os
import socket
import threading
import zlib
from functools import partial

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from lightvlm.models.processor import decode_image, to_rgb
from lightvlm.server.httpserver.media import (
    ImageError,
    MediaLimits,
    MediaLoader,
    check_url,
    inspect_image,
    is_public_address,
    refusal,
)

from helpers import IMAGES, image_bytes

REFUSED = ["127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
           "169.254.169.254", "fe80::1", "fc00::1", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "240.0.0.1",
           "255.255.255.255", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1",
           "192.0.2.1", "198.18.0.1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_global_addresses_are_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_global_addresses_are_allowed(address):
    assert is_public_address(address)


def limits(**changes) -> MediaLimits:
    return MediaLimits(**{"fetch_timeout": 2.0, "max_bytes": 1 << 20, "max_pixels": 10**7, **changes})


GENERIC = "^could not fetch the image URL$"


@pytest.mark.parametrize("url, message", [("ftp://127.0.0.1/x.png", r"must be http\(s\)"),
                                          ("http:///x.png", "no host")])
def test_malformed_urls_say_so(url, message):
    with pytest.raises(ImageError, match=message):
        check_url(url, limits())


@pytest.mark.parametrize("url, reason", [
    ("http://user:pw@127.0.0.1/x.png", "credentials"),
    ("http://user@localhost/x.png", "credentials"),
    ("http://127.0.0.1:8000/metrics", "not a global address"),
    ("http://[::1]:8000/x.png", "not a global address"),
    ("http://[::ffff:127.0.0.1]/x.png", "not a global address"),
])
def test_refused_urls_get_the_generic_answer_and_the_log_the_reason(url, reason):
    assert reason in refusal(url, limits())
    with pytest.raises(ImageError, match=GENERIC):
        check_url(url, limits())


def test_the_domain_allow_list_is_exact():
    allowed = limits(allow_private=True, allowed_domains=("localhost",))
    assert refusal("http://localhost:1/x.png", allowed) is None
    assert refusal("http://LOCALHOST.:1/x.png", allowed) is None
    for url in ("http://127.0.0.1:1/x.png", "http://sub.localhost:1/x.png"):
        assert "allowed_media_domains" in refusal(url, allowed)


class Counting(http.server.SimpleHTTPRequestHandler):
    """Serves the image fixtures; /redirect/N/name redirects N times before the file; /to/URL
    redirects to URL; /slow never answers in time."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path.startswith("/redirect/"):
            _, _, hops, name = self.path.split("/", 3)
            target = f"/redirect/{int(hops) - 1}/{name}" if int(hops) > 1 else f"/{name}"
            return self.redirect(target)
        if self.path.startswith("/to/"):
            return self.redirect(self.path[len("/to/"):])
        if self.path.startswith("/slow"):
            threading.Event().wait(3)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().do_GET()

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def files():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(IMAGES)))
    httpd.hits = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def fetch(url: str, **changes) -> bytes:
    async def run():
        loader = MediaLoader(limits(**changes))
        try:
            return await loader.fetch(url)
        finally:
            await loader.close()
    return asyncio.run(run())


def test_loopback_urls_are_refused_before_connecting(files):
    port = files.server_address[1]
    files.hits.clear()
    for host in ("127.0.0.1", "localhost", "[::1]"):  # localhost goes through the resolver, which filters
        with pytest.raises(ImageError, match=GENERIC):
            fetch(f"http://{host}:{port}/coffee.jpg")
    assert files.hits == []


def test_private_urls_are_fetched_when_allowed(files):
    port = files.server_address[1]
    assert fetch(f"http://127.0.0.1:{port}/coffee.jpg", allow_private=True) == image_bytes("coffee.jpg")
    assert fetch(f"http://localhost:{port}/coffee.jpg", allow_private=True) == image_bytes("coffee.jpg")


def test_at_most_three_redirects_each_checked_again(files):
    base = f"http://127.0.0.1:{files.server_address[1]}"
    assert fetch(f"{base}/redirect/3/coffee.jpg", allow_private=True) == image_bytes("coffee.jpg")
    with pytest.raises(ImageError, match=GENERIC):
        fetch(f"{base}/redirect/4/coffee.jpg", allow_private=True)
    files.hits.clear()
    with pytest.raises(ImageError, match=GENERIC):  # the hop names a host not on the list
        fetch(f"{base}/to/http://localhost:{files.server_address[1]}/coffee.jpg", allow_private=True,
              allowed_domains=("127.0.0.1",))
    assert files.hits == [f"/to/http://localhost:{files.server_address[1]}/coffee.jpg"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_fetch_failure_says_the_same(files):
    """Refused connection, HTTP 404, a timeout and a body over the cap: one text, nothing about the target."""
    base = f"http://127.0.0.1:{files.server_address[1]}"
    cases = [(f"http://127.0.0.1:{closed_port()}/x.png", {}), (f"{base}/missing.png", {}),
             (f"{base}/slow/coffee.jpg", {"fetch_timeout": 0.5}), (f"{base}/coffee.jpg", {"max_bytes": 100})]
    messages = set()
    for url, changes in cases:
        with pytest.raises(ImageError) as error:
            fetch(url, allow_private=True, **changes)
        messages.add(str(error.value))
    assert messages == {"could not fetch the image URL"}


def test_file_urls_only_below_the_allowed_folder(tmp_path):
    inside = tmp_path / "media"
    inside.mkdir()
    (inside / "coffee.jpg").write_bytes(image_bytes("coffee.jpg"))
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", inside / "link.jpg")
    root = os.path.realpath(inside)
    assert fetch(f"file://{inside}/coffee.jpg", local_path=root) == image_bytes("coffee.jpg")
    for url in (f"file://{inside}/../secret.txt", f"file://{inside}/link.jpg", f"file://{tmp_path}/secret.txt"):
        with pytest.raises(ImageError, match=GENERIC):
            fetch(url, local_path=root)
    with pytest.raises(ImageError, match="without --allowed_local_media_path"):
        fetch(f"file://{inside}/coffee.jpg")
    with pytest.raises(ImageError, match=GENERIC):
        fetch(f"file://{inside}/missing.jpg", local_path=root)


def rotated_jpeg(path, orientation: int) -> bytes:
    image = Image.fromarray(np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3))
    exif = image.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif, quality=95)
    path.write_bytes(out.getvalue())
    return out.getvalue()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_transformers_does(tmp_path, orientation):
    data = rotated_jpeg(tmp_path / "photo.jpg", orientation)
    reference = load_image(str(tmp_path / "photo.jpg"))  # transformers: exif_transpose, then RGB
    ours = decode_image(data).convert("RGB")
    assert ours.size == reference.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
    header = inspect_image(data, 10**6)  # the size the httpserver lays the image out by
    assert (header.width, header.height) == reference.size


def test_a_30000_square_png_is_refused_from_its_header():
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = (30000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    with pytest.raises(ImageError, match="pixels"):
        inspect_image(bytes(data), 40_000_000)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(IMAGES / "coffee.jpg").convert("RGB").resize((64, 48))


@pytest.mark.parametrize("kind", ["cmyk", "palette with transparency", "animated", "gray with alpha"])
def test_images_as_users_send_them_match_transformers(photo, kind):
    """Header size, decode and RGB conversion as transformers' image processors see the file (the
    first frame of an animation; transparency composited onto white)."""
    data = {"cmyk": lambda: encoded(photo.convert("CMYK"), "JPEG"),
            "palette with transparency": lambda: encoded(photo.convert("P", palette=Image.ADAPTIVE, colors=16),
                                                         "PNG", transparency=3),
            "animated": lambda: encoded(photo, "GIF", save_all=True, append_images=[photo.rotate(90)],
                                        duration=100, loop=0),
            "gray with alpha": lambda: encoded(photo.convert("LA"), "PNG")}[kind]()
    header = inspect_image(data, 10**6)
    ours = np.asarray(to_rgb(decode_image(data)))
    reference = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    assert (header.width, header.height) == (64, 48) and ours.shape == (48, 64, 3)
    np.testing.assert_array_equal(ours, reference)


def test_a_16_bit_png_is_scaled_not_clipped(photo):
    gray = np.asarray(photo.convert("L")).astype(np.uint16) * 257 + 128  # 8-bit values, spread to 16 bits
    data = encoded(Image.fromarray(gray), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    ours = np.asarray(to_rgb(decode_image(data)))
    np.testing.assert_array_equal(ours, np.repeat((gray >> 8)[..., None], 3, axis=2).astype(np.uint8))
    assert ours.std() > 10  # PIL's own conversion would give all 255
