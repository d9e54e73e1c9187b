"""Video files -> sampled RGB frames, with PyAV (FFmpeg's libraries in-process; never a subprocess).

What the container says is checked before anything is decoded: its duration, frame count and frame
size against the limits. What it does not say is counted while demuxing (frames, duration) or
decoding (frame size), and the limit is enforced there. Frames are sampled by index in display order
(the caller's `sample(total_frames, fps)` picks them, as transformers' video processors do), and only
the chosen ones are converted to RGB; decoding stops after the last one.

Only container formats that hold video are probed (`format_whitelist`): no image pipes (an image is not
a one-frame video here) and no playlists, which would make FFmpeg open other files or URLs.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np

# FFmpeg demuxer names (av_match_list compares comma-separated names).
VIDEO_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,mpeg,mpegts,flv,ogg,asf,h264,hevc,m4v,mpegvideo"


class VideoError(ValueError):
    """A video that cannot be used; the message says why (for the client), `reason` labels the metric."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one video (None: unbounded). The flag names are the server's."""

    max_frames: int | None = None  # --max_video_frames: frames the video holds
    max_seconds: float | None = None  # --max_video_seconds
    max_pixels: int | None = None  # --video_max_pixels: width x height of a frame


@dataclass(frozen=True)
class Video:
    """The sampled frames of a decoded video and what its container says about it."""

    frames: np.ndarray  # uint8 [num_sampled, H, W, 3], RGB, in the order of `indices`
    indices: tuple[int, ...]  # which frames of the video (display order), as the sampler chose them
    total_frames: int
    fps: float | None
    width: int
    height: int


def read_video(data: bytes, sample: Callable[[int, float | None], tuple[int, ...]],
               limits: VideoLimits = VideoLimits()) -> Video:
    """Decode the frames `sample(total_frames, fps)` picks. Raises VideoError (whatever `sample` raises
    passes through)."""
    if not data:
        raise VideoError("the video is empty", "not_a_video")
    try:
        container = av.open(io.BytesIO(data), options={"format_whitelist": VIDEO_FORMATS})
    except (av.FFmpegError, EOFError, OSError, ValueError) as e:
        raise VideoError(f"the data is not a video PyAV can read ({ffmpeg_message(e)}): not a video container, or "
                         "a truncated file", "not_a_video") from None
    with container:
        stream = video_stream(container)
        fps = float(stream.average_rate) if stream.average_rate else None
        width, height = stream.codec_context.width, stream.codec_context.height
        check_pixels(width, height, limits)
        seconds = declared_seconds(container, stream)
        check_seconds(seconds, limits)
        total = stream.frames or count_frames(container, stream, limits, seconds is None)
        check_frames(total, limits)
        if total == 0:
            raise VideoError("the video has no frames", "no_frames")
        indices = sample(total, fps)
        frames = decode_frames(container, stream, indices, limits, seconds is None)
    first = frames[indices[0]]
    return Video(np.stack([frames[i] for i in indices]), tuple(indices), total, fps, first.shape[1], first.shape[0])


def ffmpeg_message(error: Exception) -> str:
    return getattr(error, "strerror", None) or type(error).__name__


def video_stream(container) -> "av.VideoStream":
    """The first video stream that is not a cover picture; an audio-only file has none."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            stream.thread_type = "AUTO"
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["no streams"]
    raise VideoError(f"the file has no video stream (it holds {', '.join(kinds)}); send a video",
                     "no_video_stream")


def declared_seconds(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


def check_pixels(width: int, height: int, limits: VideoLimits) -> None:
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise VideoError(f"the video's frames are {width}x{height} = {width * height} pixels; the limit is "
                         f"{limits.max_pixels} (--video_max_pixels)", "too_many_pixels")


def check_seconds(seconds: float | None, limits: VideoLimits) -> None:
    if seconds is not None and limits.max_seconds is not None and seconds > limits.max_seconds:
        raise VideoError(f"the video is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s "
                         "(--max_video_seconds)", "too_long")


def check_frames(num_frames: int, limits: VideoLimits, counting: bool = False) -> None:
    """`counting`: `num_frames` so far (the video has at least that many)."""
    if limits.max_frames is not None and num_frames > limits.max_frames:
        has = f"more than {limits.max_frames}" if counting else str(num_frames)
        raise VideoError(f"the video has {has} frames; the limit is {limits.max_frames} (--max_video_frames)",
                         "too_many_frames")


def count_frames(container, stream, limits: VideoLimits, check_time: bool) -> int:
    """Frames of a container that does not state their number (WebM): its video packets, counted
    without decoding; the limits are checked as they are counted."""
    count = 0
    try:
        for packet in container.demux(stream):
            if not packet.size:
                continue
            count += 1
            check_frames(count, limits, counting=True)
            if check_time and packet.pts is not None and packet.time_base:
                check_seconds(float(packet.pts * packet.time_base), limits)
        container.seek(0)
    except av.FFmpegError as e:
        raise VideoError(f"the video data is corrupt ({ffmpeg_message(e)})", "corrupt") from None
    return count


def decode_frames(container, stream, indices: tuple[int, ...], limits: VideoLimits,
                  check_time: bool) -> dict[int, np.ndarray]:
    """The frames at `indices` as RGB arrays; decoding stops after the last one."""
    wanted, last = set(indices), max(indices)
    frames: dict[int, np.ndarray] = {}
    count = 0
    try:
        for frame in container.decode(stream):
            if count == 0:
                check_pixels(frame.width, frame.height, limits)
            if check_time and frame.time is not None:
                check_seconds(frame.time, limits)
            if count in wanted:
                frames[count] = frame.to_ndarray(format="rgb24")
            count += 1
            check_frames(count, limits, counting=True)
            if count > last:
                break
    except av.FFmpegError as e:
        raise VideoError(f"the video data is corrupt or truncated after {count} frames ({ffmpeg_message(e)})",
                         "corrupt") from None
    if count == 0:
        raise VideoError("the video has no decodable frames (a truncated or corrupt file?)", "no_frames")
    if count <= last:
        raise VideoError(f"the video ends after {count} decodable frames but says it has {stream.frames or last + 1} "
                         "(a truncated or corrupt file?)", "truncated")
    return frames
