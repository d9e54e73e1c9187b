"""The Qwen-VL model's parts against transformers' own helpers: where patches sit (rotary, windows,
interpolated positions), M-RoPE positions and their decode delta, attention within segments; the
vision towers split over two ranks; the demo checkpoints in both weight layouts."""

import json
import multiprocessing as mp
import queue

import pytest
import torch
import torch.nn.functional as F
from transformers.vision_utils import (
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

from lightvlm import GenerationConfig, pipeline
from lightvlm.common.distributed import SINGLE, init_tp_group
from lightvlm.common.ports import free_ports
from lightvlm.engine.visual_encoder import VisualEncoder
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.demo import build_demo_checkpoint
from lightvlm.models.processor import split_messages
from lightvlm.models.qwen_vl.config import QwenVLConfig
from lightvlm.models.qwen_vl.model import mrope_positions
from lightvlm.models.qwen_vl.vision import interpolated_positions, patch_coordinates, segment_attention, window_order
from lightvlm.models.qwen_vl.weights import rename

from helpers import load_image
from qwen_vl_references import (
    VARIANTS,
    assert_same_greedy,
    hf_generate,
    hf_inputs,
    hf_model,
    messages,
    reference_checkpoint,
)

GRIDS = [(1, 4, 6), (1, 10, 2), (1, 8, 8), (1, 2, 2), (1, 14, 22)]


def test_patch_order_is_transformers():
    expected = get_vision_position_ids(torch.tensor(GRIDS), 2)
    ours = [torch.stack(patch_coordinates(g, 2), dim=-1) for g in GRIDS]
    assert torch.equal(torch.cat(ours), expected)


@pytest.mark.parametrize("window_units", [2, 4])
def test_windows_are_transformers(window_units):
    index, cu_seqlens = get_vision_window_index(torch.tensor(GRIDS), 2, window_units * 2 * 14, 14)
    order, lengths = window_order(GRIDS, 2, window_units)
    assert torch.equal(order, index)
    assert [0, *torch.tensor(lengths).cumsum(0).tolist()] == cu_seqlens.tolist()


def test_interpolated_positions_are_transformers():
    table = torch.randn(25, 8, generator=torch.Generator().manual_seed(0))
    indices, weights = get_vision_interpolation_indices_and_weights(torch.tensor(GRIDS), 5, mode="bilinear",
                                                                    align_corners=True, spatial_merge_size=2)
    ours_indices, ours_weights = interpolated_positions(GRIDS, 2, 5)
    expected = (table[indices] * weights[:, :, None]).sum(1)
    assert torch.allclose((table[ours_indices] * ours_weights[:, :, None]).sum(1), expected, atol=1e-6)


def test_segment_attention_keeps_segments_apart():
    q, k, v = (torch.randn(40, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    lengths = [4, 16, 4, 0, 12, 4]
    expected, start = [], 0
    for n in lengths:
        rows = slice(start, start + n)
        if n:
            out = F.scaled_dot_product_attention(*(x[rows].transpose(0, 1) for x in (q, k, v)))
            expected.append(out.transpose(0, 1))
        start += n
    assert torch.allclose(segment_attention(q, k, v, lengths), torch.cat(expected), atol=1e-6)


def test_mrope_positions_and_delta_are_transformers(qwen_vl_reference):
    """Images mid-text, of different grids, and text after them: transformers' get_rope_index."""
    conversation = [{"role": "user", "content": [
        {"type": "text", "text": "First"}, {"type": "image", "image": load_image("coffee_strip_600x40.jpg")},
        {"type": "text", "text": "then"}, {"type": "image", "image": load_image("camera_gray.png")},
        {"type": "text", "text": "and some words after the two of them."}]}]
    inputs = hf_inputs(qwen_vl_reference, conversation)
    positions, delta = hf_model(qwen_vl_reference).model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    processor = LoadedCheckpoint.open(qwen_vl_reference).processor
    templated, images = split_messages(conversation)
    prompt = processor.encode_chat(templated, [processor.image_grid(*im.size) for im in images])
    plan = mrope_positions(len(prompt.input_ids), tuple(prompt.images), processor.merge_size)
    assert torch.equal(plan.table, positions[:, 0])
    assert plan.delta == int(delta)
    n = len(prompt.input_ids)
    after = plan.slice(n - 2, 4)  # the prompt's last two, then two outputs, as chunks straddle them
    assert torch.equal(after[:, :2], positions[:, 0, -2:])
    assert torch.equal(after[:, 2:], torch.tensor([n, n + 1]).expand(3, -1) + int(delta))


def encode_references(model_dirs, tp):
    """Each checkpoint's rows for two images of other shapes, encoded in one batch."""
    torch.set_num_threads(1)
    out = []
    for model_dir in model_dirs:
        ckpt = LoadedCheckpoint.open(model_dir)
        images = [load_image("rocket.jpg"), load_image("coffee_strip_600x40.jpg")]
        grids = [ckpt.processor.image_grid(*im.size) for im in images]
        encoder = VisualEncoder(ckpt, tp=tp, show_progress=False)
        out.append(encoder.encode([ckpt.processor.preprocess(im, g) for im, g in zip(images, grids)], grids))
    return out


def rank_main(rank, size, port, model_dirs, results):
    tp = init_tp_group(rank, size, f"tcp://127.0.0.1:{port}", torch.device("cpu"))
    rows = encode_references(model_dirs, tp)
    if rank == 0:
        results.put([[r.numpy() for r in per_model] for per_model in rows])
    torch.distributed.barrier()


def test_sharded_vision_towers_equal_unsharded(checkpoints_dir):
    """--visual_tp 2: heads, MLPs and mergers split over two ranks (gloo), all three towers in one go."""
    model_dirs = [reference_checkpoint(checkpoints_dir, v) for v in VARIANTS]
    expected = encode_references(model_dirs, SINGLE)
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_ports(1)[0]
    processes = [ctx.Process(target=rank_main, args=(r, 2, port, model_dirs, results)) for r in range(2)]
    for p in processes:
        p.start()
    try:
        while True:
            try:
                sharded = results.get(timeout=1)
                break
            except queue.Empty:
                assert not [p.exitcode for p in processes if p.exitcode not in (None, 0)], "a rank failed"
        for p in processes:
            p.join(60)
    finally:
        for p in processes:
            p.kill()
    for per_model, ours in zip(expected, sharded):
        for rows, other in zip(per_model, ours):
            assert torch.allclose(torch.from_numpy(other), rows, atol=1e-5)


def test_both_weight_layouts_name_the_same_parameters():
    """The Hub's (and transformers 5's saved) Qwen2-VL layout and the nested one of Qwen3-VL."""
    pairs = {"visual.blocks.0.attn.qkv.weight": ("visual", "tower.blocks.0.attn.qkv.weight"),
             "model.visual.blocks.0.attn.qkv.weight": ("visual", "tower.blocks.0.attn.qkv.weight"),
             "visual.merger.mlp.0.bias": ("visual", "tower.merger.fc1.bias"),
             "model.visual.merger.linear_fc2.weight": ("visual", "tower.merger.fc2.weight"),
             "model.visual.merger.ln_q.weight": ("visual", "tower.merger.norm.weight"),
             "model.visual.deepstack_merger_list.1.linear_fc1.weight":
                 ("visual", "tower.deepstack_mergers.1.fc1.weight"),
             "model.visual.blocks.2.mlp.linear_fc1.bias": ("visual", "tower.blocks.2.mlp.fc1.bias"),
             "model.layers.3.self_attn.q_proj.weight": ("language", "language_model.layers.3.self_attn.q_proj.weight"),
             "model.language_model.norm.weight": ("language", "language_model.norm.weight"),
             "model.embed_tokens.weight": ("language", "language_model.embed_tokens.weight"),
             "lm_head.weight": ("language", "lm_head.weight")}
    assert {name: rename(name) for name in pairs} == pairs
    assert rename("visual.rotary_pos_emb.inv_freq")[0] == "visual"  # no such parameter: skipped by the loader


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_demo_checkpoints_load_in_both_and_match_transformers(arch, checkpoints_dir):
    """The demo builder writes the nested layout (model.visual.*, model.language_model.*)."""
    model_dir = build_demo_checkpoint(checkpoints_dir / f"demo-{arch}", arch=arch)
    conversation = messages("Describe this image.", [load_image("chelsea.png")])
    reference, inputs = hf_generate(model_dir, conversation, 12)
    ours = pipeline(model_dir, max_batch_size=2, session_len=1024, max_total_token_num=2048, data_type="fp32")
    response = ours(conversation, GenerationConfig(max_new_tokens=12))
    assert response.input_token_len == inputs["input_ids"].shape[1]
    assert_same_greedy(model_dir, response.token_ids, reference, inputs, f"demo {arch}")


def test_hub_style_flat_configs_read_like_nested_ones(checkpoints_dir):
    """The Hub's Qwen2-VL / Qwen2.5-VL config.json keep the text fields at the top level, spell rope as
    rope_scaling {"type": "mrope"} with rope_theta beside it, and the ViT's channels as in_chans."""
    for variant in ("qwen2_vl", "qwen2_5_vl"):
        nested = json.loads((reference_checkpoint(checkpoints_dir, variant) / "config.json").read_text())
        text = dict(nested["text_config"])
        rope = text.pop("rope_parameters")
        hub_rope = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **text,
                "rope_theta": rope["rope_theta"], "rope_scaling": hub_rope,
                "vision_config": {**{k: v for k, v in nested["vision_config"].items() if k != "in_channels"},
                                  "in_chans": 3}}
        assert getattr(QwenVLConfig, variant)(flat) == getattr(QwenVLConfig, variant)(nested)
