"""Entry point: `python -m lightvlm.server.api_server --enable_multimodal --model_dir DIR`.

Without --model_dir, the `small` random-weight demo checkpoint is built once into the cache folder
(LIGHTVLM_CACHE, default ~/.cache/lightvlm) and served.
"""

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from lightvlm.common.logging import get_logger, setup_logging
from lightvlm.config import build_parser, parse_config
from lightvlm.models.processor import load_processor
from lightvlm.models.registry import LoadedCheckpoint
from lightvlm.models.weight_loader import CheckpointError, resolve_dtype
from lightvlm.server.launcher import launch

logger = get_logger("lightvlm.launcher")


def demo_checkpoint() -> str:
    from lightvlm.models.demo import build_demo_checkpoint

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # --help and bad flags end here
    setup_logging(args.log_level, "launcher")
    model_dir = args.model_dir or demo_checkpoint()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        ckpt = LoadedCheckpoint.open(model_dir)
        load_processor(ckpt.family.processor_class, model_dir)  # INTERNVL_IMAGE_LENGTH and friends fail here
    except (CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"lightvlm: {e}") from None
    if args.trust_remote_code:
        logger.info("--trust_remote_code is accepted for compatibility; lightvlm never runs checkpoint code")
    config = parse_config(argv, model_dir, ckpt.config.text.max_position_embeddings, device,
                          torch.cuda.device_count())
    config = replace(config, model=replace(config.model, processor_class=ckpt.family.processor_class,
                                           eos_token_ids=ckpt.eos_token_ids))
    if device == "cuda" and config.visual.enabled and config.visual.dp * config.visual.tp != config.model.tp:
        logger.warning("visual_dp x visual_tp (%d) differs from tp (%d): GPU memory will be used unevenly",
                       config.visual.dp * config.visual.tp, config.model.tp)
    dtype = resolve_dtype(config.model.data_type, device, model_dir)
    row_bytes = ckpt.config.text.hidden_size * torch.empty((), dtype=dtype).element_size()
    return launch(config, row_bytes)


if __name__ == "__main__":
    sys.exit(main())
