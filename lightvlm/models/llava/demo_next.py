"""Random-weight LLaVA-NeXT checkpoints (LlavaNextForConditionalGeneration):
`python -m lightvlm.models.demo --arch llava_next --size tiny [--backbone llama|qwen2]`.

The tiny ones scale LLaVA-NeXT's pinpoints (336 x {672, 1008} ...) down to 32-pixel crops: up to four
crops plus the base, so up to 16 + 8 x 9 = 88 rows an image.
"""

from dataclasses import replace
from pathlib import Path

import torch

from lightvlm.models.llava.demo import TINY_TEXT, DemoSpec, demo_weights, write_checkpoint

TINY_PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))

SPECS: dict[tuple[str, str], DemoSpec] = {
    ("tiny", "llama"): DemoSpec(TINY_TEXT["llama"], grid_pinpoints=TINY_PINPOINTS),
    ("tiny", "qwen2"): DemoSpec(replace(TINY_TEXT["qwen2"], vocab_target=650), feature_layer=(-2, -1),
                                grid_pinpoints=TINY_PINPOINTS),
}


def build(size: str, backbone: str, out: Path, dtype: torch.dtype, shard_bytes: int | None) -> None:
    spec = SPECS[size, backbone]
    write_checkpoint(spec, "LlavaNextForConditionalGeneration", out, dtype,
                     demo_weights(dtype, shard_bytes, spec.text.initializer_range))
