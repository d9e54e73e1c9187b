"""SamplingParams.validate: each bound refuses just past it with a message naming it, and accepts at it."""

import math
import re

import pytest
import torch

from lightvlm import sampling_params as bounds
from lightvlm.sampling_params import SamplingParams

STOPS, TOKENS, BIAS = bounds.MAX_STOP_SEQUENCES, bounds.MAX_STOP_TOKEN_IDS, bounds.MAX_LOGIT_BIAS_ENTRIES
LONGEST, LOGPROBS = bounds.MAX_STOP_LENGTH, bounds.MAX_LOGPROBS
BOUNDS = [  # (field, value at the bound, value just past it, words the message must have)
    ("stop_sequences", [f"s{i}" for i in range(STOPS)], [f"s{i}" for i in range(STOPS + 1)], f"at most {STOPS} stop"),
    ("stop_sequences", ["x" * LONGEST], ["x" * (LONGEST + 1)], f"at most {LONGEST} characters"),
    ("stop_token_ids", list(range(TOKENS)), list(range(TOKENS + 1)), f"at most {TOKENS} stop_token_ids"),
    ("logit_bias", dict.fromkeys(range(BIAS), 1.0), dict.fromkeys(range(BIAS + 1), 1.0), f"at most {BIAS} entries"),
    ("top_logprobs", LOGPROBS, LOGPROBS + 1, f"top_logprobs must be an integer in [0, {LOGPROBS}]"),
    ("seed", 2**64 - 1, 2**64, "seed must be an integer in [0, 2**64)"),
    ("seed", 0, -1, "seed must be an integer in [0, 2**64)"),
]


@pytest.mark.parametrize(("name", "at", "past", "words"), BOUNDS)
def test_a_bound_accepts_at_it_and_refuses_past_it_naming_it(name, at, past, words):
    SamplingParams(**{name: at}).validate()
    with pytest.raises(ValueError, match=re.escape(words)):
        SamplingParams(**{name: past}).validate()


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_float_fields_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"{name} must be"):
        SamplingParams(**{name: value}).validate()


def test_large_finite_values_still_get_their_range_checks():
    SamplingParams(temperature=1e6, repetition_penalty=1e6).validate()
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={0: math.inf}).validate()


def test_choice_seeds_near_the_top_wrap_and_torch_accepts_them():
    params = SamplingParams(seed=2**64 - 3).validate()
    seeds = [params.for_choice(i).seed for i in range(16)]
    assert seeds[:4] == [2**64 - 3, 2**64 - 2, 2**64 - 1, 0]
    assert len(set(seeds)) == 16
    for i, seed in enumerate(seeds):
        torch.Generator().manual_seed(seed)  # seed + 3 unwrapped: "Overflow when unpacking long long"
        params.for_choice(i).validate()
