"""The one table that picks each op's implementation by device (triton_kernels/ops.py)."""

from dataclasses import fields

import torch

from lightvlm.common.triton_kernels.ops import KERNELS, MODULES, TWINS, Ops, ops_for, select_ops


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
