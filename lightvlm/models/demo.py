"""Build random-weight demo checkpoints offline, in the Hugging Face layout real checkpoints use.

    python -m lightvlm.models.demo --arch internvl --size tiny --out DIR
    python -m lightvlm.models.demo --arch qwen2_vl|qwen2_5_vl|qwen3_vl --out DIR

Each family's folder builds its own (`models/<family>/demo.py`, on the shared `demo_kit`). The folder
holds what a real HF-format checkpoint holds (config.json, model.safetensors or shards with an index,
tokenizer files with a chat template, processor configs, generation_config.json), so that both
lightvlm and transformers load it unchanged. Deterministic: the same command writes the same bytes.
Its answers are noise; the server says so when it serves one.
"""

import argparse
import os
import shutil
from pathlib import Path

import torch

from lightvlm.common.logging import get_logger
from lightvlm.models.registry import load_object

logger = get_logger(__name__)

# --arch -> the family's builder: `build(size, backbone, out, dtype, shard_bytes)` and its SPECS keyed (size,
# backbone), found in a module ("package.module") or on an object of one ("package.module:OBJECT")
BUILDERS = {"internvl": "lightvlm.models.internvl.demo",
            "qwen2_vl": "lightvlm.models.qwen_vl.demo:QWEN2_VL",
            "qwen2_5_vl": "lightvlm.models.qwen_vl.demo:QWEN2_5_VL",
            "qwen3_vl": "lightvlm.models.qwen_vl.demo:QWEN3_VL",
            "llava": "lightvlm.models.llava.demo", "llava_next": "lightvlm.models.llava.demo_next"}


def builder_part(arch: str, name: str):
    path = BUILDERS[arch]
    return load_object(f"{path}.{name}" if ":" in path else f"{path}:{name}")


def build_demo_checkpoint(out: str | os.PathLike, arch: str = "internvl", size: str = "tiny",
                          backbone: str | None = None, dtype: str = "float32",
                          shard_bytes: int | None = None) -> Path:
    """Writes the checkpoint folder and returns its path. Safe to call on an existing folder. Without a
    backbone, the arch's first one for that size."""
    if arch not in BUILDERS:
        raise ValueError(f"no demo checkpoints for arch={arch}; known: {', '.join(BUILDERS)}")
    specs = builder_part(arch, "SPECS")
    if backbone is None:
        backbone = next((b for s, b in specs if s == size), "")
    if (size, backbone) not in specs:
        known = ", ".join("/".join(k) for k in specs)
        raise ValueError(f"no demo checkpoint for arch={arch} size={size} backbone={backbone}; known: {known}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builder_part(arch, "build")(size, backbone, out, getattr(torch, dtype), shard_bytes)
    return out


def demo_checkpoint() -> str:
    """The server's checkpoint when it is given none: the `small` InternVL demo, built once into the cache
    folder (LIGHTVLM_CACHE, default ~/.cache/lightvlm)."""
    cache = Path(os.environ.get("LIGHTVLM_CACHE", Path.home() / ".cache" / "lightvlm"))
    folder = cache / "demo-internvl-small"
    if not (folder / "config.json").exists():
        logger.info("building the demo checkpoint into %s (once)", folder)
        partial = cache / f".demo-internvl-small.{os.getpid()}"
        build_demo_checkpoint(partial, arch="internvl", size="small")
        try:
            partial.rename(folder)  # atomic: a concurrent build that finished first wins
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    logger.warning("serving the demo checkpoint in %s: its weights are RANDOM, its output is noise", folder)
    return str(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="internvl", choices=sorted(BUILDERS))
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--backbone", default=None, choices=["qwen2", "llama", "qwen3"],
                        help="language model backbone (default: the arch's first; InternVL tiny offers qwen2 and "
                             "llama, the Qwen-VL models have their own)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shard_mb", type=float, default=None,
                        help="split the weights into safetensors shards of about this many MB")
    parser.add_argument("--out", required=True, help="folder to write the checkpoint into")
    args = parser.parse_args(argv)
    shard_bytes = None if args.shard_mb is None else int(args.shard_mb * 2**20)
    path = build_demo_checkpoint(args.out, args.arch, args.size, args.backbone, args.dtype, shard_bytes)
    print(f"wrote a random-weight {args.arch} {args.size} ({args.backbone or 'default backbone'}) checkpoint to "
          f"{path}")


if __name__ == "__main__":
    main()
