import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation on a fused [gate | up] projection."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # one temporary fewer: the activation's output takes the product
