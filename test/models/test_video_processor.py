"""Videos through our processors give transformers' ids, pixel_values_videos, grids, second_per_grid_ts and
M-RoPE positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), and InternVL's frames path gives transformers' InternVL
video inputs; the frames PyAV decodes are transformers' own; the sampling arithmetic is torch's.

transformers' side: its processors with test/video_references.py's stand-in for the video processor
(torchvision-free; see there)."""

import av
import numpy as np
import pytest
import torch

from lightvlm.common.video import read_video
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.frames import frame_pixels
from lightvlm.models.processor import split_media
from lightvlm.models.qwen_vl.model import mrope_positions
from lightvlm.models.video import VideoRequestError, VideoSampling, torch_arange
from lightvlm.pipeline import read_video_source

import hf_reference
from helpers import load_image
from qwen_vl_references import hf_inputs, hf_model, variant_of
from video_references import attach, frames_metadata


@pytest.fixture(scope="module")
def processors():
    return {}


def ours_for(model_dir, processors):
    if model_dir not in processors:
        processors[model_dir] = LoadedCheckpoint.open(model_dir).make_processor()
    return processors[model_dir]


def encode(processor, conversation):
    """Our ids, prompt items and the pixels of every video part (in prompt order) for a conversation."""
    templated, images, video_sources = split_media(conversation)
    images = [im if not isinstance(im, str) else load_image(im) for im in images]
    videos = [read_video_source(v, processor) for v in video_sources]
    prompt = processor.encode_chat(templated, [processor.image_grid(*im.size) for im in images],
                                   videos=[meta for _, meta, _ in videos])
    pixels = [frame_pixels(processor, videos[o.index][0][list(o.part.frames)], item.grid)
              for item, o in zip(prompt.images, prompt.origins) if o.kind == "video"]
    return prompt, pixels


def decoded_frames(path) -> list[np.ndarray]:
    """Every frame of a file, decoded with PyAV as transformers' read_video_pyav does (rgb24)."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def pil_frames(path, count=None):
    from PIL import Image

    frames = decoded_frames(path)[:count]
    return [Image.fromarray(f) for f in frames]


def video_conversation(video_part: dict, image=None, text="What happens in this video?"):
    content = [video_part, *([{"type": "image", "image": image}] if image is not None else []),
               {"type": "text", "text": text}]
    return [{"role": "system", "content": "You are a careful assistant."}, {"role": "user", "content": content}]


def hf_part(part: dict) -> dict:
    """The part as transformers reads it: the sampling goes to the processor call instead."""
    return {k: v for k, v in part.items() if k not in ("fps", "num_frames")}


def assert_same(model_dir, ours, conversation, **hf_kwargs):
    """Our encoding of `conversation` against transformers' (its processor kwargs: fps, video_metadata, ...)."""
    prompt, pixels = encode(ours, conversation)
    hf_conv = [{**m, "content": [hf_part(p) for p in m["content"]]} if isinstance(m["content"], list) else m
               for m in conversation]
    reference = hf_inputs(model_dir, hf_conv, **hf_kwargs)
    assert prompt.input_ids == reference["input_ids"][0].tolist()
    assert torch.equal(torch.from_numpy(np.concatenate(pixels)), reference["pixel_values_videos"])
    video_items = [item for item, o in zip(prompt.images, prompt.origins) if o.kind == "video"]
    grids = reference["video_grid_thw"].tolist()
    if variant_of(model_dir) == "qwen3_vl":  # one part per temporal patch
        grids = [[1, h, w] for t, h, w in grids for _ in range(t)]
    assert [list(item.grid) for item in video_items] == grids
    if "second_per_grid_ts" in reference:
        seconds = torch.tensor([item.seconds_per_step for item in video_items], dtype=torch.float32)
        assert torch.equal(seconds, reference["second_per_grid_ts"])  # transformers keeps them in float32
    rows = [i for item in video_items for i in range(item.offset, item.offset + item.num_rows)]
    assert rows == torch.nonzero(reference["mm_token_type_ids"][0] == 2).flatten().tolist()
    check_positions(model_dir, prompt, reference)
    return prompt


def check_positions(model_dir, prompt, reference):
    """Our M-RoPE table equals transformers' get_rope_index (video spacing, timestamps, images)."""
    model = hf_model(model_dir).model
    kwargs = {k: reference[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in reference}
    positions, delta = model.get_rope_index(reference["input_ids"], reference["mm_token_type_ids"], **kwargs)
    tokens_per_second = getattr(model.config.vision_config, "tokens_per_second", None) \
        if variant_of(model_dir) == "qwen2_5_vl" else None
    plan = mrope_positions(len(prompt.input_ids), tuple(prompt.images), 2, tokens_per_second)
    assert torch.equal(plan.table, positions[:, 0])
    assert plan.delta == int(delta)


def test_a_video_file_by_default_by_fps_and_by_num_frames(qwen_vl_reference, processors, video_fixtures):
    ours = ours_for(qwen_vl_reference, processors)
    path = str(video_fixtures["pan.mp4"])
    default = assert_same(qwen_vl_reference, ours, video_conversation({"type": "video", "path": path}))
    sampled = assert_same(qwen_vl_reference, ours, video_conversation({"type": "video", "path": path, "fps": 3}),
                          fps=3)
    assert default.images != sampled.images
    if variant_of(qwen_vl_reference) != "qwen3_vl":  # transformers' Qwen3-VL refuses num_frames next to its fps=2
        assert_same(qwen_vl_reference, ours, video_conversation({"type": "video", "path": path, "num_frames": 5}),
                    num_frames=5)


def test_frames_without_and_with_their_fps(qwen_vl_reference, processors, video_fixtures):
    """Frames given as images: without fps as transformers takes frames without metadata (Qwen3-VL samples
    them again, assuming 24 fps); with fps, as frames sampled at that rate. An odd count pads its patch."""
    ours = ours_for(qwen_vl_reference, processors)
    frames = pil_frames(video_fixtures["longer.mp4"], 11)
    assert_same(qwen_vl_reference, ours, video_conversation({"type": "video", "video": frames}))
    assert_same(qwen_vl_reference, ours, video_conversation({"type": "video", "video": frames, "fps": 2}),
                video_metadata=[frames_metadata(11, 2)], do_sample_frames=False)


def test_a_video_and_an_image_in_one_message_and_a_second_turn(qwen_vl_reference, processors, video_fixtures):
    ours = ours_for(qwen_vl_reference, processors)
    frames = pil_frames(video_fixtures["pan.webm"])
    conversation = video_conversation({"type": "video", "video": frames, "fps": 6}, image=load_image("coffee.jpg"))
    conversation += [{"role": "assistant", "content": "A cat and a rocket."},
                     {"role": "user", "content": [{"type": "image", "image": load_image("chelsea.png")},
                                                  {"type": "text", "text": "And this one?"}]}]
    prompt = assert_same(qwen_vl_reference, ours, conversation, video_metadata=[frames_metadata(9, 6)],
                         do_sample_frames=False)
    assert [o.kind for o in prompt.origins].count("image") == 2


def test_our_decoder_gives_the_frames_transformers_decodes(video_fixtures):
    """mp4 (H.264) and webm (VP9, whose container does not count its frames): the sampled frames are the
    decoded frames at those indices."""
    for name in ("pan.mp4", "pan.webm", "longer.mp4"):
        everything = decoded_frames(video_fixtures[name])
        video = read_video(video_fixtures[name].read_bytes(), lambda total, fps: tuple(range(0, total, 2)))
        assert video.total_frames == len(everything)
        assert np.array_equal(video.frames, np.stack(everything[::2])), name
    from transformers.video_utils import read_video_pyav

    reference, metadata = read_video_pyav(str(video_fixtures["pan.mp4"]), lambda metadata, **_: np.array([1, 4, 6]))
    ours = read_video(video_fixtures["pan.mp4"].read_bytes(), lambda total, fps: (1, 4, 6))
    assert np.array_equal(ours.frames, reference) and ours.fps == metadata.fps


def test_sampling_indices_are_torch_arange_to_the_last_frame():
    for total in [*range(1, 300), *range(300, 4000, 97)]:
        for n in [*range(1, min(total, 64) + 1), *range(64, min(total, 768) + 1, 41)]:
            for start in (0, total / n / 2):
                assert np.array_equal(torch_arange(start, total, total / n),
                                      torch.arange(start, total, total / n).int().numpy()), (start, total, n)


def test_bad_sampling_requests_are_refused(qwen_vl_reference, processors):
    ours = ours_for(qwen_vl_reference, processors)
    with pytest.raises(VideoRequestError, match="not both"):
        VideoSampling(fps=2, num_frames=4)
    for bad in ({"fps": 0}, {"fps": True}, {"num_frames": 0}, {"num_frames": 2.5}):
        with pytest.raises(VideoRequestError, match="must be"):
            VideoSampling(**bad)
    if variant_of(qwen_vl_reference) != "qwen3_vl":
        with pytest.raises(VideoRequestError, match="cannot sample 20 frames from a video of 8"):
            ours.sample_frames(8, 4.0, VideoSampling(num_frames=20))
    with pytest.raises(ValueError, match="unknown field"):
        split_media([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x", "fsp": 2}}]}])


def test_internvl_frames_equal_transformers_internvl_video_path(tiny_checkpoint, video_fixtures):
    """Each frame one tile with "Frame{i}: <img>...</img>", sampled by fps and by num_frames, next to an image."""
    ours = LoadedCheckpoint.open(tiny_checkpoint).make_processor()
    reference = attach(hf_reference.hf_processor(tiny_checkpoint), "internvl",
                       {**ours_internvl_settings(tiny_checkpoint), "do_sample_frames": False})
    path = str(video_fixtures["pan.mp4"])
    sampled = {"do_sample_frames": True}
    for part, kwargs in (({"type": "video", "path": path}, {}),
                         ({"type": "video", "path": path, "fps": 2}, {"fps": 2, **sampled}),
                         ({"type": "video", "path": path, "num_frames": 3}, {"num_frames": 3, **sampled})):
        conversation = video_conversation(part, image=load_image("rocket.jpg"))
        prompt, pixels = encode(ours, conversation)
        expected = reference.apply_chat_template([{**m, "content": [hf_part(p) for p in m["content"]]}
                                                  if isinstance(m["content"], list) else m for m in conversation],
                                                 add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt", processor_kwargs=kwargs)
        assert prompt.input_ids == expected["input_ids"][0].tolist()
        image = ours.preprocess(load_image("rocket.jpg"), prompt.images[-1].grid)
        assert torch.equal(torch.from_numpy(np.concatenate([*pixels, image])), expected["pixel_values"])
        assert len(pixels) == {"fps": 4, "num_frames": 3}.get(next(iter(kwargs), ""), 8)


def ours_internvl_settings(model_dir) -> dict:
    import json

    return json.loads((model_dir / "preprocessor_config.json").read_text())


def test_models_without_video_say_so(llava_checkpoints, tiny_qwen2):
    """LLaVA (images only) and a text-only model (its processor over any tokenizer) refuse videos by name."""
    from lightvlm.models.processor import TextProcessor

    llava = LoadedCheckpoint.open(llava_checkpoints.get("llava_qwen2")).processor
    text_only = TextProcessor(tiny_qwen2)
    for processor, why in ((llava, "send chosen frames as images"), (text_only, "text-only")):
        assert "takes no videos" in processor.video_refusal and why in processor.video_refusal
        with pytest.raises(ValueError, match="takes no"):
            processor.encode("<video> hi", [], videos=[object()])


def test_original_internvl_takes_each_frame_as_one_tile_preprocessed_as_its_images(references, video_fixtures):
    """OpenGVLab's layout has no video processor: its model card's load_video makes each frame one
    448-pixel tile with the image preprocessing (bicubic, ImageNet mean and std), and so do we."""
    processor = LoadedCheckpoint.open(references("original-qwen2")).make_processor()
    assert processor.video_refusal is None
    frames = pil_frames(video_fixtures["pan.mp4"], 3)
    prompt, pixels = encode(processor, video_conversation({"type": "video", "video": frames}))
    assert len(pixels) == 3 and prompt.input_ids.count(processor.image_token_id) == 3 * processor.tokens_per_tile
    # the frames path resizes as transformers' video processors do, the image path as its image processor:
    # both round to 8 bits, so a pixel may differ by one level (1/255 over the smallest std)
    one_level = 1.001 / 255 / min(processor.tiling.image_std)
    for frame, tile in zip(frames, pixels):
        np.testing.assert_allclose(tile, processor.preprocess(frame, (1, 1)), rtol=0, atol=one_level)
