"""Videos at the edge: fetch (through the media loader's `fetch`, so that one URL policy governs images
and videos) or base64, then decode with PyAV and sample the frames the model's video processor would
take, in the thread pool, never on the event loop.

The caps (--max_video_bytes, --max_video_frames, --max_video_seconds, --video_max_pixels) are checked
before decoding where the container states the number, and while demuxing or decoding otherwise
(common/video.py). The sampled frames travel to the vision encoder as raw RGB in shared memory, one
segment per part of the video's layout (common/shm.py `write_media`): the encoder never decodes a
video again.
"""

import asyncio
from dataclasses import dataclass

import numpy as np

from lightvlm.common.identity import content_digest
from lightvlm.common.video import VideoLimits, read_video
from lightvlm.config import HttpConfig
from lightvlm.models.video import VideoMeta, VideoSampling
from lightvlm.server.httpserver.media import ImageError, MediaLoader, decode_base64


@dataclass(frozen=True)
class LoadedVideo:
    frames: np.ndarray  # the sampled frames, uint8 [n, H, W, 3]
    meta: VideoMeta
    digest: str  # MD5 of the file's bytes (common.identity)

    def part_frames(self, positions: tuple[int, ...]) -> np.ndarray:
        """The frames of a part (positions into the sampled frames): a view where they follow each other."""
        first = positions[0]
        if positions == tuple(range(first, first + len(positions))):
            return self.frames[first:first + len(positions)]
        return self.frames[list(positions)]


class VideoLoader:
    def __init__(self, media: MediaLoader, http: HttpConfig, processor, executor=None):
        self.media, self.processor, self.executor = media, processor, executor
        self.max_bytes = http.max_video_bytes
        self.limits = VideoLimits(http.max_video_frames, http.max_video_seconds, http.video_max_pixels)

    async def load(self, kind: str, data: str, sampling: VideoSampling) -> LoadedVideo:
        """kind: "url" (http(s) or a data: URL) or "base64". Raises ImageError (fetching), VideoError
        (decoding, the caps) or VideoRequestError (the sampling asked for)."""
        if kind == "url" and data.startswith("data:"):
            kind, data = "base64", data.split(",", 1)[1] if "," in data else ""
        if kind == "url":
            raw = await self.media.fetch(data, self.max_bytes, what="video")
        elif kind == "base64":
            raw = await self._run(decode_base64, data, self.max_bytes, "video")
        else:
            raise ImageError(f"video type must be 'url' or 'base64', got {kind!r}", "bad_type")
        return await self._run(self.decode, raw, sampling)

    def decode(self, raw: bytes, sampling: VideoSampling) -> LoadedVideo:
        video = read_video(raw, lambda total, fps: self.processor.sample_frames(total, fps, sampling), self.limits)
        meta = VideoMeta(video.total_frames, video.fps, video.width, video.height, video.indices)
        return LoadedVideo(video.frames, meta, content_digest(raw))

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
