"""The one table that picks each op's implementation by device (triton_kernels/ops.py)."""

from collections import Counter
from dataclasses import fields

import torch

from lightvlm import GenerationConfig, pipeline
from lightvlm.common.triton_kernels import ops as ops_module
from lightvlm.common.triton_kernels.ops import KERNELS, MODULES, TWINS, Ops, ops_for, select_ops
from lightvlm.common.triton_kernels.token_decode_attention import SPLIT_MIN_LEN, multiprocessor_count, uses_split

from helpers import load_image


def test_every_op_has_a_kernel_for_cuda_and_a_twin_for_the_cpu():
    for op in (f.name for f in fields(Ops)):
        kernel, twin = getattr(KERNELS, op), getattr(TWINS, op)
        assert kernel is getattr(MODULES[op], op)
        assert twin is getattr(MODULES[op], f"{op}_torch")
        assert kernel is not twin


def test_cuda_with_triton_gets_the_kernels_everything_else_the_twins():
    assert select_ops("cuda", has_triton=True) is KERNELS
    assert select_ops("cuda", has_triton=False) is TWINS
    assert select_ops("cpu", has_triton=True) is TWINS
    assert ops_for(torch.device("cpu")) is TWINS


def test_the_engine_runs_every_op_through_the_table(monkeypatch, tiny_qwen2):
    """Prefill and decode of a sampled request with an image: each op of the table is called, so the
    device's choice reaches every call site (no call site runs its own copy of an op)."""
    calls = Counter()

    def counted(op, implementation):
        def call(*args, **kwargs):
            calls[op] += 1
            return implementation(*args, **kwargs)
        return call

    recording = Ops(**{f.name: counted(f.name, getattr(TWINS, f.name)) for f in fields(Ops)})
    monkeypatch.setattr(ops_module, "_ops_for_type", lambda device_type: recording)
    pipe = pipeline(tiny_qwen2, max_batch_size=2, session_len=1024, max_total_token_num=2048, data_type="fp32")
    out = pipe(("Describe this image.", load_image("coffee.jpg")),
               GenerationConfig(max_new_tokens=4, do_sample=True, top_k=5, top_p=0.9, seed=1, ignore_eos=True))
    assert len(out.token_ids) == 4
    assert set(calls) == {f.name for f in fields(Ops)}, sorted(calls)


def test_decode_attention_splits_only_small_batches_over_long_tables():
    """On an H200 (132 multiprocessors): 8 requests of 32 heads over 32k-slot tables split the
    context, 64 requests fill the GPU without it, short tables never split, the CPU never does."""
    assert uses_split(8, 32, 32768, 132)
    assert not uses_split(64, 32, 32768, 132)
    assert not uses_split(1, 8, SPLIT_MIN_LEN - 1, 132)
    assert uses_split(1, 8, SPLIT_MIN_LEN, 132)
    assert not uses_split(1, 8, 32768, multiprocessor_count(torch.device("cpu")))
