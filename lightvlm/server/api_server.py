"""Entry point: `python -m lightvlm.server.api_server --enable_multimodal --model_dir DIR`.

Without --model_dir, the `small` random-weight demo checkpoint is built once into the cache folder
(LIGHTVLM_CACHE, default ~/.cache/lightvlm) and served.
"""

import sys

import torch

from lightvlm.common.logging import setup_logging
from lightvlm.config import build_parser, parse_config
from lightvlm.models.demo import demo_checkpoint
from lightvlm.server.launcher import launch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # --help and bad flags end here
    setup_logging(args.log_level, "launcher")
    model_dir = args.model_dir or demo_checkpoint()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return launch(parse_config(argv, model_dir, device, torch.cuda.device_count()))


if __name__ == "__main__":
    sys.exit(main())
