"""The encoder room's service: sharing the cores, it encodes a batch one image per unit of work."""

import contextlib
import io
import pickle

import numpy as np
import torch
from PIL import Image

from lightvlm.common import shm
from lightvlm.common.cpu_share import CpuShare
from lightvlm.engine.visual_encoder import VisualEncoder
from lightvlm.io_struct import ImageItem
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.visualserver.encoder_worker import EncoderService


class CountingShare(CpuShare):
    """The real table; counts the units of work and the threads each one ran with."""

    def __init__(self, name: str, slot: int, cores: int):
        super().__init__(name, slot, cores)
        self.threads: list[int] = []

    @contextlib.contextmanager
    def working(self, parallel: bool = True):
        with super().working(parallel):
            self.threads.append(torch.get_num_threads())
            yield


def encode_all(service: EncoderService, items: list[ImageItem], prefix: str) -> list[torch.Tensor]:
    results = pickle.loads(service.exposed_encode(pickle.dumps(items)))
    assert [r.error for r in results] == [None] * len(items)
    rows = []
    for item in items:
        segment = shm.attach(shm.embedding_segment(prefix, item.key))
        rows.append(shm.read_embeddings(segment.buf).clone())
        segment.close()
    return rows


def test_a_shared_encoder_encodes_image_by_image_with_the_threads_of_its_share(tiny_qwen2):
    ckpt = LoadedCheckpoint.open(str(tiny_qwen2))
    encoder = VisualEncoder(ckpt, show_progress=False)
    prefix = shm.instance_name() + "t_"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    items, segments = [], []  # the encoder unlinks nothing: the test removes all under `prefix`
    for i, colour in enumerate(colours):
        data = io.BytesIO()
        Image.new("RGB", (64 + 16 * i, 48), colour).save(data, format="PNG")
        grid = ckpt.processor.image_grid(64 + 16 * i, 48)
        num_rows = ckpt.processor.image_span(grid)[2]
        name = shm.bytes_segment(prefix, 1, i)
        num_bytes = shm.write_media(name, data.getvalue())
        key = f"image{i}"
        segments.append(shm.create(shm.embedding_segment(prefix, key),
                                   shm.embeddings_nbytes(num_rows, ckpt.embedding_width, torch.float32)))
        items.append(ImageItem(key, 0, num_rows, grid, name, num_bytes))
    table = prefix + "cpu"
    threads = torch.get_num_threads()
    segments.append(CpuShare.create(table, 2))
    try:
        batched = encode_all(EncoderService(encoder, ckpt.processor, torch.float32, prefix, True), items, prefix)
        share = CountingShare(table, 1, cores=2)
        alone = encode_all(EncoderService(encoder, ckpt.processor, torch.float32, prefix, True, share), items, prefix)
        assert share.threads == [2, 2, 2]  # one unit per image; the model worker (slot 0) idle: both cores
        share.table[0] = 1  # the model worker is busy: one core each
        encode_all(EncoderService(encoder, ckpt.processor, torch.float32, prefix, True, share), items[:2], prefix)
        assert share.threads[3:] == [1, 1]
        for one, other in zip(batched, alone):
            np.testing.assert_allclose(one.numpy(), other.numpy(), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
        for segment in segments:
            segment.close()
        shm.sweep(prefix)
