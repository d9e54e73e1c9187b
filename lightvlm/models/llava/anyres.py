"""LLaVA-NeXT's "anyres" geometry, from the image's size alone (no pixels, no torch).

The image is fitted into the best of the `image_grid_pinpoints` resolutions, cut into crops of the
vision tower's size, and the crops' feature maps are joined into one map from which the rows and
columns that only the letterbox padding filled are cut away again ("unpadding"). The same
arithmetic as transformers (select_best_resolution, get_patch_output_size, unpad_image), including
its float rounding, so that the number of image tokens is the same before decoding.
"""

import math
from dataclasses import dataclass
from functools import lru_cache


def select_best_resolution(height: int, width: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps most of the image's resolution, then wastes the least."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_height, target_width), effective, wasted
    return best


def fit_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """The image's size scaled to fit inside the target, aspect ratio kept (rounded up on the short side)."""
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def unpadded_size(height: int, width: int, map_height: int, map_width: int) -> tuple[int, int]:
    """Rows and columns of a feature map of the letterboxed image that the image itself covers."""
    if width / height > map_width / map_height:
        padding = (map_height - int(round(height * (map_width / width), 7))) // 2
        return map_height - 2 * padding, map_width
    padding = (map_width - int(round(width * (map_height / height), 7))) // 2
    return map_height, map_width - 2 * padding


@dataclass(frozen=True)
class AnyresLayout:
    """An image's layout: `rows` x `columns` crops of the best resolution, and the `feature_height` x
    `feature_width` map left of them after unpadding. As a grid tuple it is what the visual half needs."""

    rows: int
    columns: int
    feature_height: int
    feature_width: int

    @property
    def grid(self) -> tuple[int, int, int, int]:
        return self.rows, self.columns, self.feature_height, self.feature_width

    @property
    def num_crops(self) -> int:
        return self.rows * self.columns + 1  # + the base image (the whole image at crop size)

    @property
    def num_rows(self) -> int:
        """Embedding rows after the base image's: the unpadded map with an image_newline after each row."""
        return self.feature_height * (self.feature_width + 1)


@lru_cache(maxsize=4096)
def anyres_layout(width: int, height: int, pinpoints: tuple[tuple[int, int], ...], crop_size: int,
                  patches_per_side: int) -> AnyresLayout:
    best_height, best_width = select_best_resolution(height, width, pinpoints)
    rows, columns = best_height // crop_size, best_width // crop_size
    feature_height, feature_width = unpadded_size(height, width, rows * patches_per_side, columns * patches_per_side)
    return AnyresLayout(rows, columns, feature_height, feature_width)
