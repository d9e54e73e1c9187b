"""InternVL's processor: dynamic tiling and `<img>` + tiles x t `<IMG_CONTEXT>` + `</img>` spans.

An image is resized onto the grid of tiles (between min_patches and max_patches of them) whose aspect
ratio is closest to its own, cut into tiles, and, when there is more than one tile, followed by a
thumbnail of the whole image. Each tile becomes `tokens_per_tile` embedding rows.

`INTERNVL_IMAGE_LENGTH` (env) sets tokens per tile; it must agree with the vision geometry.
"""

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from lightvlm.models.internvl.config import InternVLConfig
from lightvlm.models.processor import (
    BaseProcessor,
    image_processor_settings,
    read_json,
    rescale_and_normalize,
    to_rgb,
)


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) grids with min_tiles <= columns*rows <= max_tiles, fewest tiles first."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])  # stable: ties keep the column-major order


@lru_cache(maxsize=1024)
def best_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's. On a tie the grid with more tiles wins
    while the image's area is still more than half the grid's area."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


def image_length_from_env(geometry_tokens: int) -> int:
    """Tokens per tile: INTERNVL_IMAGE_LENGTH if set (it must match the checkpoint), else the geometry."""
    value = os.environ.get("INTERNVL_IMAGE_LENGTH")
    if not value:
        return geometry_tokens
    try:
        tokens = int(value)
    except ValueError:
        raise ValueError(f"INTERNVL_IMAGE_LENGTH={value!r} is not an integer") from None
    if tokens != geometry_tokens:
        raise ValueError(f"INTERNVL_IMAGE_LENGTH={tokens} contradicts the checkpoint, whose vision tower gives "
                         f"{geometry_tokens} tokens per tile ((image_size / patch_size)^2 x downsample_ratio^2); "
                         f"unset it or set it to {geometry_tokens}")
    return tokens


class InternVLProcessor(BaseProcessor):
    image_token = "<IMG_CONTEXT>"

    def __init__(self, model_dir: str | Path, config: InternVLConfig):
        """Checks the processor's settings against the model's: tile size vs the vision tower's
        image_size, tokens per tile vs image_seq_length and INTERNVL_IMAGE_LENGTH."""
        super().__init__(model_dir)
        pre, source = image_processor_settings(self.model_dir)
        size = pre.get("size") or {}
        if not size.get("height") or size.get("height") != size.get("width"):
            raise ValueError(f"{source} in {self.model_dir}: InternVL tiles must be square, got size={size}")
        self.tile_size = size["height"]
        if self.tile_size != config.vision.image_size:
            raise ValueError(f"the processor's tile size is {self.tile_size} ({source}) but the vision tower's "
                             f"image_size is {config.vision.image_size} (config.json vision_config): they must agree")
        self.min_tiles = pre.get("min_patches", 1)
        self.max_tiles = pre.get("max_patches", 12)
        self.resample = Image.Resampling(pre.get("resample", Image.Resampling.BICUBIC))
        self.rescale_factor = pre.get("rescale_factor", 1 / 255)
        self.image_mean = pre.get("image_mean", [0.485, 0.456, 0.406])
        self.image_std = pre.get("image_std", [0.229, 0.224, 0.225])

        self.tokens_per_tile = image_length_from_env(config.tokens_per_tile)
        declared = read_json(self.model_dir / "processor_config.json").get("image_seq_length")
        if declared is not None and declared != self.tokens_per_tile:
            raise ValueError(f"processor_config.json says image_seq_length={declared} but the vision tower gives "
                             f"{self.tokens_per_tile} tokens per tile")
        self.start_id, self.end_id = self.token_id("<img>"), self.token_id("</img>")

    @property
    def settings(self) -> str:
        return (f"internvl tile={self.tile_size} tiles={self.min_tiles}-{self.max_tiles} "
                f"tokens={self.tokens_per_tile} resample={int(self.resample)} scale={self.rescale_factor} "
                f"mean={self.image_mean} std={self.image_std}")

    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(tile columns, tile rows); more than one tile adds a thumbnail. Always tiled: transformers'
        InternVLProcessor turns crop_to_patches on whatever the configs say."""
        if self.max_tiles <= 1:
            return 1, 1
        return best_grid(width, height, self.tile_size, self.min_tiles, self.max_tiles)

    @staticmethod
    def num_tiles(grid: tuple[int, int]) -> int:
        columns, rows = grid
        return columns * rows + (1 if columns * rows > 1 else 0)  # + thumbnail

    def image_span(self, grid: tuple[int, int]) -> tuple[tuple[int, ...], int, int]:
        num_rows = self.num_tiles(grid) * self.tokens_per_tile
        return (self.start_id, *([self.image_token_id] * num_rows), self.end_id), 1, num_rows

    def preprocess(self, image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
        """-> tiles [n, 3, S, S] float32, the thumbnail last."""
        image = to_rgb(image)
        columns, rows = grid
        s = self.tile_size
        resized = np.asarray(image.resize((s * columns, s * rows), resample=self.resample))  # [H, W, 3]
        tiles = [resized[r * s:(r + 1) * s, c * s:(c + 1) * s]
                 for r in range(rows) for c in range(columns)]
        if len(tiles) > 1:
            tiles.append(np.asarray(image.resize((s, s), resample=self.resample)))
        return rescale_and_normalize(np.stack(tiles), self.rescale_factor, self.image_mean, self.image_std)
