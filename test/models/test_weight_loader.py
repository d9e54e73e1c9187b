"""Loading HF-layout checkpoints: sharded or single, fp32/bf16, threads, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightvlm.common.distributed import SINGLE
from lightvlm.engine.visual_encoder import VisualEncoder
from lightvlm.models.checkpoint import CheckpointError, LoadedCheckpoint, checkpoint_files
from lightvlm.models.demo import build_demo_checkpoint
from lightvlm.models.weight_loader import auto_dtype, build_part, cpu_flags, resolve_dtype


def state(module):
    return {k: v.float().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("ck") / "sharded", shard_bytes=150_000)


def test_sharded_checkpoint_loads_the_same_weights(tiny_qwen2, sharded):
    assert len(checkpoint_files(sharded)) > 2
    single = build_part(LoadedCheckpoint.open(tiny_qwen2), "language", SINGLE, torch.float32, "cpu",
                        show_progress=False)
    shards = build_part(LoadedCheckpoint.open(sharded), "language", SINGLE, torch.float32, "cpu", load_workers=3,
                                  show_progress=False)
    a, b = state(single), state(shards)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loadworker_threads_show_a_progress_bar(sharded, capsys):
    build_part(LoadedCheckpoint.open(sharded), "language", SINGLE, torch.float32, "cpu", load_workers=4)
    assert "Loading safetensors" in capsys.readouterr().err


def test_bf16_data_type(tiny_qwen2):
    ckpt = LoadedCheckpoint.open(tiny_qwen2)
    model = build_part(ckpt, "language", SINGLE, torch.bfloat16, "cpu", show_progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.language_model.rotary.cos.dtype == torch.float32  # rotary tables stay fp32
    reference = load_file(tiny_qwen2 / "model.safetensors")["model.language_model.norm.weight"]
    assert torch.equal(model.language_model.norm.weight, reference.to(torch.bfloat16))


def test_auto_dtype_is_bf16_on_cpus_with_bf16_matrix_units_and_the_checkpoints_on_cuda(tmp_path):
    bf16 = build_demo_checkpoint(tmp_path / "bf16", dtype="bfloat16")
    assert auto_dtype("cpu", bf16, frozenset({"avx2", "avx512f", "avx512_bf16"}))[0] == torch.bfloat16  # Zen 4
    assert auto_dtype("cpu", bf16, frozenset({"avx512f", "amx_tile", "amx_bf16"}))[0] == torch.bfloat16  # SPR
    assert auto_dtype("cpu", bf16, frozenset({"avx2", "avx512f"}))[0] == torch.float32
    assert auto_dtype("cpu", bf16, frozenset())[0] == torch.float32  # /proc/cpuinfo unreadable
    assert auto_dtype("cuda", bf16, frozenset())[0] == torch.bfloat16
    assert resolve_dtype("auto", "cpu", bf16) == auto_dtype("cpu", bf16, cpu_flags())[0]  # this machine's flags
    assert resolve_dtype("fp16", "cpu", bf16) == torch.float16
    assert resolve_dtype("fp32", "cpu", bf16) == torch.float32
    with pytest.raises(ValueError, match="unknown data type 'int4'"):
        resolve_dtype("int4", "cpu", bf16)


def test_cpu_flags_reads_this_machines_cpuinfo():
    assert {"fpu", "sse2"} <= cpu_flags()  # every x86-64 CPU has these; this project's machines are x86-64


def test_missing_tensor_is_named(tiny_qwen2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen2, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.language_model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"language_model\.layers\.1\.self_attn\.qkv_proj\.weight \(part k\)"):
        build_part(LoadedCheckpoint.open(broken), "language", SINGLE, torch.float32, "cpu", show_progress=False)


def test_wrong_shape_is_reported(tiny_qwen2, tmp_path):
    broken = tmp_path / "shape"
    shutil.copytree(tiny_qwen2, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.multi_modal_projector.linear_2.bias"] = torch.zeros(3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="multi_modal_projector.linear_2.bias.*shape mismatch"):
        VisualEncoder(LoadedCheckpoint.open(broken), show_progress=False)


def test_unknown_architecture_lists_supported_ones(tiny_qwen2, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_qwen2, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture 'MysteryForCausalLM'; supported: "
                                              ".*InternVLChatModel, InternVLForConditionalGeneration, Llama"):
        LoadedCheckpoint.open(other)


def test_missing_folder_and_missing_weights(tmp_path, tiny_qwen2):
    with pytest.raises(CheckpointError, match="does not exist"):
        LoadedCheckpoint.open(tmp_path / "nowhere")
    empty = tmp_path / "no-weights"
    shutil.copytree(tiny_qwen2, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        checkpoint_files(empty)


def test_older_checkpoint_layout_loads(tiny_llama, tmp_path):
    """transformers < 4.52 saved `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`."""
    old = tmp_path / "old"
    shutil.copytree(tiny_llama, old)
    tensors = load_file(old / "model.safetensors")
    renamed = {}
    for name, tensor in tensors.items():
        name = name.replace("model.language_model.", "language_model.model.")
        name = name.replace("lm_head.", "language_model.lm_head.")
        renamed[name.removeprefix("model.")] = tensor
    save_file(renamed, old / "model.safetensors")
    a = build_part(LoadedCheckpoint.open(tiny_llama), "language", SINGLE, torch.float32, "cpu", show_progress=False)
    b = build_part(LoadedCheckpoint.open(old), "language", SINGLE, torch.float32, "cpu", show_progress=False)
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
