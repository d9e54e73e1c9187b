"""Shared layers against transformers' definitions."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lightvlm.models.layers.rotary import inverse_frequencies


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},  # no original length
    {"rope_type": "dynamic", "factor": 2.0},  # within max_position_embeddings: the plain frequencies
])
def test_rope_scaling_equals_transformers(scaling):
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=2048,
                         rope_parameters={**scaling, "rope_theta": 500000.0})
    expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours = inverse_frequencies(64, 500000.0, scaling, max_positions=2048)
    assert torch.allclose(ours, expected, rtol=1e-6)
