"""PyAV decoding under limits (before decoding where the container says, while demuxing or decoding
where it does not), the frames layout of shared memory, and the video flags."""

import numpy as np
import pytest

from lightvlm.common import shm
from lightvlm.common.video import VideoError, VideoLimits, read_video
from lightvlm.config import parse_config

from helpers import image_bytes

ALL = lambda total, fps: tuple(range(total))  # noqa: E731


def refused(data: bytes, limits: VideoLimits = VideoLimits(), sample=ALL) -> VideoError:
    with pytest.raises(VideoError) as info:
        read_video(data, sample, limits)
    return info.value


def test_caps_the_container_states_are_checked_exactly_and_the_others_while_counting(video_fixtures):
    mp4, webm = video_fixtures["pan.mp4"].read_bytes(), video_fixtures["pan.webm"].read_bytes()
    assert "has 8 frames; the limit is 7 (--max_video_frames)" in str(refused(mp4, VideoLimits(max_frames=7)))
    # a WebM does not count its frames: they are counted (without decoding) up to one over the limit
    assert "has more than 5 frames" in str(refused(webm, VideoLimits(max_frames=5)))
    assert "the limit is 1 s (--max_video_seconds)" in str(refused(webm, VideoLimits(max_seconds=1)))
    assert "= 12288 pixels; the limit is 12000" in str(refused(mp4, VideoLimits(max_pixels=12000)))
    video = read_video(webm, ALL, VideoLimits(max_frames=9, max_seconds=1.5, max_pixels=112 * 80))
    assert video.frames.shape == (9, 80, 112, 3) and video.total_frames == 9 and video.fps == 6


def test_what_is_not_a_usable_video_says_why(video_fixtures):
    reasons = {name: refused(video_fixtures[name].read_bytes()).reason
               for name in ("not_a_video.mp4", "truncated.mp4", "cut.mp4", "zero_frames.mp4", "audio.m4a")}
    assert reasons == {"not_a_video.mp4": "not_a_video", "truncated.mp4": "not_a_video", "cut.mp4": "corrupt",
                       "zero_frames.mp4": "no_frames", "audio.m4a": "no_video_stream"}
    assert refused(image_bytes("coffee.jpg")).reason == "not_a_video"  # an image is no one-frame video
    assert refused(b"").reason == "not_a_video"


def test_only_the_sampled_frames_are_kept_in_their_order(video_fixtures):
    data = video_fixtures["longer.mp4"].read_bytes()
    every = read_video(data, ALL).frames
    picked = read_video(data, lambda total, fps: (3, 3, 0, 11))
    assert picked.indices == (3, 3, 0, 11) and np.array_equal(picked.frames, every[[3, 3, 0, 11]])


def test_frames_cross_shared_memory_behind_their_header():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    image = image_bytes("coffee.jpg")
    for name, data in (("lvlmtestframes", frames), ("lvlmtestimage", image)):
        size = shm.write_media(name, data)
        try:
            back = shm.read_media(name, size)
        finally:
            shm.unlink(name)
        assert (np.array_equal(back, frames) if isinstance(data, np.ndarray) else back == image)
    assert shm.frames_nbytes(3, 5, 7) == shm.HEADER.size + 3 * 5 * 7 * 3


def test_video_flags():
    config = parse_config(["--max_video_frames", "100", "--max_video_seconds", "2.5", "--video_max_pixels", "640",
                           "--max_video_bytes", "1000"], "/tmp/model", "cpu", 0)
    http = config.http
    assert (http.max_video_frames, http.max_video_seconds, http.video_max_pixels, http.max_video_bytes) == \
        (100, 2.5, 640, 1000)
    for flag in ("--max_video_frames", "--video_max_pixels", "--max_video_bytes", "--max_video_seconds"):
        with pytest.raises(SystemExit, match=flag):
            parse_config([flag, "0"], "/tmp/model", "cpu", 0)
