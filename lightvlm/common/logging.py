import logging
import sys


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: str = "info", room: str = "") -> None:
    prefix = f"[{room}] " if room else ""
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
