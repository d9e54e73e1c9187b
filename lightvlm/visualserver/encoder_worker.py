"""An encoder worker: one rank of one vision-encoder replica, behind rpyc.

`encode(pickled [EncodeJob])` decodes each image from shared memory, preprocesses it with the family's
processor, runs the vision tower and projector as one batch, and (rank 0) writes each image's rows
into its cache entry. A batch that raises is retried image by image, so one bad image fails alone.
"""

import hashlib
import io
import os
import pickle

import numpy as np
import torch
from PIL import Image

from lightvlm.common import shm
from lightvlm.common.cpu_share import thread_policy, threads_for, working
from lightvlm.common.distributed import init_tp_group
from lightvlm.common.logging import get_logger
from lightvlm.common.process import run_room
from lightvlm.common.rpc import NoDelayService, serve
from lightvlm.config import ServerConfig
from lightvlm.engine.visual_encoder import VisualEncoder, write_embeddings
from lightvlm.io_struct import EncodeJob, EncodeResult
from lightvlm.models.registry import LoadedCheckpoint
from lightvlm.models.weight_loader import resolve_dtype

logger = get_logger(__name__)

FAULT_ENV = "LIGHTVLM_FAULT_IMAGE_MD5"  # tests: the encoder raises on the image whose bytes have this MD5


class EncoderService(NoDelayService):
    def __init__(self, encoder: VisualEncoder, processor, store_dtype: torch.dtype, is_writer: bool,
                 cpu_share=None):
        super().__init__()
        self.cpu_share = cpu_share
        self.encoder, self.processor = encoder, processor
        self.store_dtype = store_dtype
        self.is_writer = is_writer
        self.fault_md5 = os.environ.get(FAULT_ENV)
        self.faulty_keys: set[str] = set()

    def exposed_encode(self, payload: bytes) -> bytes:
        with working(self.cpu_share):
            return self._encode(pickle.loads(payload))

    def _encode(self, jobs: list[EncodeJob]) -> bytes:
        results: dict[str, EncodeResult] = {}
        pixels: dict[str, np.ndarray] = {}
        for job in jobs:
            try:
                pixels[job.key] = self._load(job)
            except Exception as e:  # noqa: BLE001 (a bad image fails its own requests only)
                results[job.key] = EncodeResult(job.key, f"the image could not be decoded: {e}", status=400)
        ready = [job for job in jobs if job.key in pixels]
        try:
            self._encode_and_store(ready, pixels)
        except Exception:  # noqa: BLE001
            for job in ready:  # find the culprit: one image at a time
                try:
                    self._encode_and_store([job], pixels)
                except Exception as e:  # noqa: BLE001
                    logger.exception("vision encoder failed on image %s", job.key)
                    results[job.key] = EncodeResult(job.key, f"the vision encoder failed: {type(e).__name__}: {e}")
        return pickle.dumps([results.get(job.key, EncodeResult(job.key)) for job in jobs])

    def _load(self, job: EncodeJob) -> np.ndarray:
        data = shm.read_bytes(job.src_shm, job.num_bytes)
        image = Image.open(io.BytesIO(data))
        image.load()
        if self.fault_md5 and hashlib.md5(data).hexdigest() == self.fault_md5:
            self.faulty_keys.add(job.key)
        return self.processor.preprocess(image)

    def _encode_and_store(self, jobs: list[EncodeJob], pixels: dict[str, np.ndarray]) -> None:
        if not jobs:
            return
        if any(job.key in self.faulty_keys for job in jobs):
            raise RuntimeError(f"injected encoder fault ({FAULT_ENV})")
        embeds = self.encoder.encode([pixels[job.key] for job in jobs])
        if not self.is_writer:
            return
        for job, rows in zip(jobs, embeds):
            segment = shm.attach(job.dst_shm)
            try:
                write_embeddings(segment.buf, rows.to(self.store_dtype))
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
        processor = ckpt.make_processor()
        service = EncoderService(encoder, processor, dtype, is_writer=tp.is_first, cpu_share=share)
        logger.info("encoder replica %d rank %d ready on %s, %s", replica, rank, device, thread_policy(share))
        return lambda: serve(service, config.runtime.visual_ports[index])

    run_room(f"encoder{replica}.{rank}", pipe, config.log_level, start)
