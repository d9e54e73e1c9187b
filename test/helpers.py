"""Small helpers shared by the tests (importable as `helpers` because pytest puts test/ on the path)."""

from pathlib import Path

from PIL import Image

IMAGES = Path(__file__).parent / "fixtures" / "images"


def load_image(name: str) -> Image.Image:
    image = Image.open(IMAGES / name)
    image.load()
    return image


def image_bytes(name: str) -> bytes:
    return (IMAGES / name).read_bytes()
