"""An encoder worker: one rank of one vision-encoder replica, behind rpyc.

`encode(pickled tuple[ImageItem])` decodes each image from its bytes in shared memory (the only
decode on the image's way through the server), preprocesses it for its grid with the family's
processor, runs the vision tower and projector over the batch, and (rank 0) writes each image's rows
into its cache entry. A video part arrives as its decoded frames (the httpserver decodes videos) and
becomes pixels the same way (models/frames.py). A batch that raises is retried image by image, so
one bad image fails alone.
"""

import hashlib
import os
import pickle

import numpy as np
import torch

from lightvlm.common import shm
from lightvlm.common.cpu_share import thread_policy, threads_for, working
from lightvlm.common.distributed import init_tp_group
from lightvlm.common.logging import get_logger
from lightvlm.common.process import run_room
from lightvlm.common.rpc import NoDelayService, serve
from lightvlm.config import ServerConfig
from lightvlm.engine.visual_encoder import VisualEncoder
from lightvlm.io_struct import EncodeResult, ImageItem
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.frames import frame_pixels
from lightvlm.models.processor import decode_image
from lightvlm.models.weight_loader import resolve_dtype

logger = get_logger(__name__)

FAULT_ENV = "LIGHTVLM_FAULT_IMAGE_MD5"  # tests: the encoder raises on the image whose bytes have this MD5


class EncoderService(NoDelayService):
    def __init__(self, encoder: VisualEncoder, processor, store_dtype: torch.dtype, prefix: str, is_writer: bool,
                 cpu_share=None):
        super().__init__()
        self.cpu_share = cpu_share
        self.encoder, self.processor = encoder, processor
        self.store_dtype = store_dtype
        self.prefix = prefix
        self.is_writer = is_writer
        self.fault_md5 = os.environ.get(FAULT_ENV)
        self.faulty_keys: set[str] = set()

    def exposed_encode(self, payload: bytes) -> bytes:
        items: list[ImageItem] = pickle.loads(payload)
        results: dict[str, EncodeResult] = {}
        pixels: dict[str, np.ndarray] = {}
        for item in items:  # decoding and preprocessing run on one thread: not counted as busy
            try:
                pixels[item.key] = self._load(item)
            except Exception as e:  # noqa: BLE001 (a bad image fails its own requests only)
                results[item.key] = EncodeResult(item.key, f"the image could not be decoded: {e}", status=400)
        ready = [item for item in items if item.key in pixels]
        # Sharing the cores, one image per unit of work: the thread count follows the model worker's
        # steps within a batch (a vision tower on the CPU gains nothing from batching images).
        groups = [[item] for item in ready] if self.cpu_share is not None else [ready]
        for group in groups:
            with working(self.cpu_share):
                results.update(self._encode_group(group, pixels))
        return pickle.dumps([results.get(item.key, EncodeResult(item.key)) for item in items])

    def _encode_group(self, items: list[ImageItem], pixels: dict[str, np.ndarray]) -> dict[str, EncodeResult]:
        if len(items) > 1:
            try:
                self._encode_and_store(items, pixels)
                return {}
            except Exception:  # noqa: BLE001 (find the culprit below: one image at a time)
                pass
        failed = {}
        for item in items:
            try:
                self._encode_and_store([item], pixels)
            except Exception as e:  # noqa: BLE001
                logger.exception("vision encoder failed on image %s", item.key)
                failed[item.key] = EncodeResult(item.key, f"the vision encoder failed: {type(e).__name__}: {e}")
        return failed

    def _load(self, item: ImageItem) -> np.ndarray:
        data = shm.read_media(item.shm_name, item.num_bytes)
        if isinstance(data, np.ndarray):  # a video part's frames
            return frame_pixels(self.processor, data, item.grid)
        if self.fault_md5 and hashlib.md5(data).hexdigest() == self.fault_md5:
            self.faulty_keys.add(item.key)
        return self.processor.preprocess(decode_image(data), item.grid)

    def _encode_and_store(self, items: list[ImageItem], pixels: dict[str, np.ndarray]) -> None:
        if not items:
            return
        if any(item.key in self.faulty_keys for item in items):
            raise RuntimeError(f"injected encoder fault ({FAULT_ENV})")
        embeds = self.encoder.encode([pixels[item.key] for item in items], [item.grid for item in items])
        if not self.is_writer:
            return
        for item, rows in zip(items, embeds):
            segment = shm.attach(shm.embedding_segment(self.prefix, item.key))
            try:
                shm.write_embeddings(segment.buf, rows.to(self.store_dtype))
            finally:
                segment.close()


def start_encoder_process(config: ServerConfig, replica: int, rank: int, pipe) -> None:
    def start():
        index = replica * config.visual.tp + rank
        device = torch.device(f"cuda:{index % max(1, torch.cuda.device_count())}"
                              if config.model.device == "cuda" else "cpu")
        share = threads_for(config.cpu.visual_threads, config.runtime.cpu_share, config.model.tp + index,
                            config.cpu.cores, device.type)
        tp = init_tp_group(rank, config.visual.tp, f"tcp://127.0.0.1:{config.runtime.visual_dist_ports[replica]}",
                           device)
        ckpt = LoadedCheckpoint.open(config.model.model_dir)
        dtype = resolve_dtype(config.model.data_type, device.type, config.model.model_dir)
        encoder = VisualEncoder(ckpt, dtype, str(device), tp=tp, load_workers=config.model.load_workers,
                                show_progress=index == 0)
        service = EncoderService(encoder, ckpt.processor, dtype, config.runtime.shm_prefix, is_writer=tp.is_first,
                                 cpu_share=share)
        logger.info("encoder replica %d rank %d ready on %s, %s", replica, rank, device, thread_policy(share))
        return lambda: serve(service, config.runtime.visual_ports[index])

    run_room(f"encoder{replica}.{rank}", pipe, config.log_level, start)
