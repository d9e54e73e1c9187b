"""The offline pipeline gives transformers' greedy tokens for videos: Qwen2-VL, Qwen2.5-VL and Qwen3-VL as
native video (checkpoints transformers itself wrote, test/qwen_vl_references.py), InternVL as frames;
one video, a video and an image in one message, and a batch."""

import json

import pytest
import torch

from lightvlm import GenerationConfig, pipeline

import hf_reference
from helpers import load_image
from qwen_vl_references import assert_same_greedy, hf_generate
from video_references import attach

MAX_NEW = 16


@pytest.fixture(scope="module")
def pipes():
    made = {}
    yield made
    for pipe in made.values():
        pipe.close()


def pipe_for(model_dir, pipes):
    if model_dir not in pipes:
        pipes[model_dir] = pipeline(model_dir, max_batch_size=8, session_len=1024, max_total_token_num=8 * 1024,
                                    batch_max_tokens=128, data_type="fp32")
    return pipes[model_dir]


def cases(video_fixtures):
    """(label, our conversation, transformers' conversation, transformers' processor kwargs)"""
    pan, longer = str(video_fixtures["pan.mp4"]), str(video_fixtures["longer.mp4"])
    one = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": pan, "fps": 3}},
                                        {"type": "text", "text": "What happens in this video?"}]}]
    hf_one = [{"role": "user", "content": [{"type": "video", "path": pan},
                                           {"type": "text", "text": "What happens in this video?"}]}]
    mixed = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "video", "path": longer},
                                          {"type": "text", "text": "with"},
                                          {"type": "image", "image": load_image("coffee.jpg")},
                                          {"type": "text", "text": "in a few words."}]}]
    return [("one video", one, hf_one, {"fps": 3}), ("a video and an image", mixed, mixed, {})]


def test_videos_alone_and_in_a_batch_match_transformers(qwen_vl_reference, pipes, video_fixtures):
    pipe = pipe_for(qwen_vl_reference, pipes)
    references = {}
    for label, ours, theirs, kwargs in cases(video_fixtures):
        response = pipe(ours, GenerationConfig(max_new_tokens=MAX_NEW))
        references[label] = hf_generate(qwen_vl_reference, theirs, MAX_NEW, **kwargs)
        reference, inputs = references[label]
        assert response.input_token_len == inputs["input_ids"].shape[1], label
        assert len(set(response.token_ids)) > 3, f"{label}: degenerate output {response.token_ids}"
        assert_same_greedy(qwen_vl_reference, response.token_ids, reference, inputs, label)
    text_only = [{"role": "user", "content": "Tell me about cats."}]
    batch = [c[1] for c in cases(video_fixtures)] * 2 + [text_only]
    responses = pipe(batch, GenerationConfig(max_new_tokens=MAX_NEW))
    for (label, *_), response in zip(cases(video_fixtures) * 2, responses):
        reference, inputs = references[label]
        assert_same_greedy(qwen_vl_reference, response.token_ids, reference, inputs, f"batch: {label}")
    pipe.scheduler.check_integrity()  # every slot free or in the prefix cache, none held by a request
    assert not pipe.scheduler.running and not pipe.images


@torch.no_grad()
def test_internvl_frames_match_transformers(tiny_checkpoint, pipes, video_fixtures):
    """Each frame a tile behind "Frame{i}:", through transformers' InternVLProcessor and model."""
    settings = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    processor = attach(hf_reference.hf_processor(tiny_checkpoint), "internvl", settings)
    path = str(video_fixtures["pan.mp4"])
    ours = [{"role": "user", "content": [{"type": "video", "path": path, "num_frames": 4},
                                         {"type": "image", "image": load_image("rocket.jpg")},
                                         {"type": "text", "text": "Describe them."}]}]
    theirs = [{"role": "user", "content": [{"type": "video", "path": path}, *ours[0]["content"][1:]]}]
    inputs = processor.apply_chat_template(theirs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"num_frames": 4})
    out = hf_reference.hf_model(tiny_checkpoint).generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    reference = out[0, inputs["input_ids"].shape[1]:].tolist()
    pipe = pipe_for(tiny_checkpoint, pipes)
    for response in [pipe(ours, GenerationConfig(max_new_tokens=MAX_NEW)),
                     *pipe([ours, ours], GenerationConfig(max_new_tokens=MAX_NEW))]:
        assert response.input_token_len == inputs["input_ids"].shape[1]
        hf_reference.assert_same_greedy(tiny_checkpoint, response.token_ids, reference, inputs, "internvl video")
