"""Small real videos for the tests, made with PyAV from the photos in test/fixtures/images at test time:
no binary blobs of unknown origin. `python test/video_fixtures.py OUT` writes them to OUT to look at.

Every clip pans a window across photos (switching photo halfway), so that its frames differ. The
codecs are H.264 (libx264) in MP4 and VP9 (libvpx-vp9) in WebM; where this PyAV build cannot encode
H.264, MPEG-4 part 2 (`mpeg4`) stands in (`H264_CODEC` says which ran). Besides the good clips:
files that must be refused (audio only, no frames, truncated) and one clip over each server cap of
test/e2e/test_video_server.py.
"""

import io
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from helpers import IMAGES

PHOTOS = ("coffee.jpg", "chelsea.png", "rocket.jpg", "astronaut.jpg")


def encoder(*names: str) -> str:
    """The first of `names` this PyAV build can encode with."""
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
    raise RuntimeError(f"PyAV can encode none of {names}")


H264_CODEC = encoder("libx264", "libopenh264", "mpeg4")
VP9_CODEC = encoder("libvpx-vp9")


def pan_frames(num_frames: int, width: int, height: int, photos=PHOTOS[:2], noise: bool = False) -> list[np.ndarray]:
    """RGB frames: a window sliding over the first photo, then over the second."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(num_frames):
        photo = Image.open(IMAGES / photos[(2 * i) // max(num_frames, 1)]).convert("RGB")
        step = i % max(1, num_frames // 2)
        box = (12 * step, 6 * step, 12 * step + photo.width // 2, 6 * step + photo.height // 2)
        frame = np.asarray(photo.crop(box).resize((width, height), Image.Resampling.BILINEAR))
        if noise:
            frame = rng.integers(0, 256, frame.shape, dtype=np.uint8)
        frames.append(frame)
    return frames


def encode(frames: list[np.ndarray], fps: int, codec: str, container: str, target=None, options=None) -> bytes:
    """Encode RGB frames (yuv420p) into `container`; into the file `target` if given (some muxer options
    need a seekable file), else into memory."""
    out_file = target or io.BytesIO()
    with av.open(out_file, mode="w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return Path(target).read_bytes() if target else out_file.getvalue()


def audio_only() -> bytes:
    """Half a second of AAC in MP4 (an .m4a): no video stream."""
    out_file = io.BytesIO()
    with av.open(out_file, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, i * 1024, Fraction(1, 16000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return out_file.getvalue()


def write_fixtures(folder: Path) -> dict[str, Path]:
    """Every test video, written into `folder`: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    clips: dict[str, bytes] = {
        # the clips the models see: 8 frames at 4 fps (2 s), 9 at 6 fps (1.5 s; odd), 12 at 8 fps
        "pan.mp4": encode(pan_frames(8, 128, 96), 4, H264_CODEC, "mp4"),
        "pan.webm": encode(pan_frames(9, 112, 80, PHOTOS[2:]), 6, VP9_CODEC, "webm"),
        "longer.mp4": encode(pan_frames(12, 96, 96, PHOTOS[1:3]), 8, H264_CODEC, "mp4"),
        "audio.m4a": audio_only(),
        # over one cap each of the video server's: 5 s, 48 frames, 200 x 150 pixels, 300 kB
        "long.webm": encode(pan_frames(10, 64, 48), 2, VP9_CODEC, "webm"),
        "dense.mp4": encode(pan_frames(48, 64, 48), 30, H264_CODEC, "mp4"),
        "large.mp4": encode(pan_frames(4, 200, 150), 4, H264_CODEC, "mp4"),
        "noise.mp4": encode(pan_frames(12, 160, 120, noise=True), 4, H264_CODEC, "mp4"),
    }
    faststart = encode(pan_frames(8, 64, 48), 4, H264_CODEC, "mp4", target=folder / "faststart.mp4",
                       options={"movflags": "faststart"})
    mdat = faststart.index(b"mdat")
    clips["zero_frames.mp4"] = faststart[:mdat + 4]  # the index (moov) says 8 frames, none follow
    clips["cut.mp4"] = faststart[:mdat + (len(faststart) - mdat) // 2]  # ends halfway through the frames
    clips["truncated.mp4"] = clips["pan.mp4"][:len(clips["pan.mp4"]) // 2]  # the index (at the end) is gone
    clips["not_a_video.mp4"] = b"this is text, not a video\n" * 40
    paths = {}
    for name, data in clips.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


if __name__ == "__main__":
    for name, path in write_fixtures(Path(sys.argv[1])).items():
        print(f"{name:20s} {path.stat().st_size:8d} bytes")
    print(f"H.264 stand-in: {H264_CODEC}, VP9: {VP9_CODEC}")
