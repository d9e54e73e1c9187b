"""Rotary position embeddings (rotate-half form): how checkpoints scale the frequencies, and how the
positions pick them (1-D, or M-RoPE's three axes), each from a table.

Positions are [T] for 1-D rotary and [3, T] (temporal, height, width) for M-RoPE. A module's
`angles(positions)`, computed once per step, gives what the `rotary` op (triton_kernels/rotary.py)
takes after q and k: row positions and the cos/sin tables they index. Each attention layer then
rotates its q and k with `ops_for(device).rotary(q, k, *angles)`.
"""

import math
from functools import partial

import torch
from torch import nn


def _default(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    return inv_freq


def _linear(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    return inv_freq / scaling["factor"]


def _llama3(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling.get("original_max_position_embeddings") or max_positions
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _dynamic(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    """Dynamic NTK (InternLM2, Qwen2.5 in InternVL): the base is raised only once a sequence grows past
    max_position_embeddings, as InternLM2's DynamicNTKScalingRotaryEmbedding and transformers' "dynamic"
    do. The engine never holds a sequence that long (LoadedCheckpoint.context_limit and the pipeline's
    session_len stop at max_position_embeddings), so within what it serves the frequencies are the
    plain ones."""
    return inv_freq


# rope_type -> how the base frequencies are rescaled
FREQUENCY_SCALINGS = {"default": _default, "linear": _linear, "llama3": _llama3, "dynamic": _dynamic}


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind not in FREQUENCY_SCALINGS:
        raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(FREQUENCY_SCALINGS)}")
    return FREQUENCY_SCALINGS[kind](inv_freq, scaling, max_positions)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# the rotary op's arguments after q and k: row positions [T] and the cos, sin tables they index
Angles = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RotaryEmbedding(nn.Module):
    """1-D positions: cos/sin tables for every position up to `max_positions`, computed once in fp32."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None,
                 mrope_section: tuple[int, ...] = ()):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling, max_positions)
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def angles(self, positions: torch.Tensor) -> Angles:
        """positions: [T]; the tables are indexed by them as they are."""
        return positions, self.cos, self.sin


def mrope_axes(mrope_section: tuple[int, ...], interleaved: bool) -> torch.Tensor:
    """For each of the head_dim / 2 frequencies, the position axis (0 t, 1 h, 2 w) it rotates by.

    Contiguous (Qwen2-VL, Qwen2.5-VL): the first section's frequencies follow t, the next h, the last w.
    Interleaved (Qwen3-VL): frequency j follows axis j % 3 while that axis' section lasts, t after.
    """
    half = sum(mrope_section)
    if not interleaved:
        return torch.cat([torch.full((n,), axis) for axis, n in enumerate(mrope_section)])
    axes = torch.zeros(half, dtype=torch.long)
    for axis in (1, 2):
        axes[axis:mrope_section[axis] * 3:3] = axis
    return axes


class MRotaryEmbedding(nn.Module):
    """M-RoPE: each frequency is rotated by the position on one of three axes (temporal, height, width).
    cos/sin are computed once per step from the [3, T] positions, with the float ops transformers uses
    (so the rotation is bit for bit transformers'), as tables of one row per step row."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None,
                 mrope_section: tuple[int, ...] = (), interleaved: bool = False):
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must add up to head_dim / 2 = {head_dim // 2}")
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta, scaling, max_positions),
                             persistent=False)
        self.register_buffer("axes", mrope_axes(tuple(mrope_section), interleaved), persistent=False)

    def angles(self, positions: torch.Tensor) -> Angles:
        """positions: [3, T]."""
        chosen = positions.index_select(0, self.axes).t().float()  # [T, D/2]: each frequency's position
        freqs = chosen * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        rows = torch.arange(emb.shape[0], device=emb.device)
        return rows, emb.cos(), emb.sin()


# TextConfig.rope_form -> the module; position_dims says what shape the positions take
ROTARY_FORMS = {
    "1d": RotaryEmbedding,
    "mrope": partial(MRotaryEmbedding, interleaved=False),
    "mrope_interleaved": partial(MRotaryEmbedding, interleaved=True),
}
POSITION_DIMS = {"1d": 1, "mrope": 3, "mrope_interleaved": 3}


def make_rotary(form: str, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                mrope_section: tuple[int, ...] = ()) -> nn.Module:
    if form not in ROTARY_FORMS:
        raise ValueError(f"unsupported rotary form {form!r}; supported: {', '.join(ROTARY_FORMS)}")
    return ROTARY_FORMS[form](head_dim, max_positions, theta, scaling, mrope_section=mrope_section)
