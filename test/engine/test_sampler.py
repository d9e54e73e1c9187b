"""The sampler's logits transformations equal transformers' logits processors on the same inputs."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lightvlm.common.triton_kernels.top_k_top_p import top_k_top_p_torch
from lightvlm.engine.sampler import (
    SamplingBatch,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    process_logits,
    sample,
    unpack_bitmask,
)

V = 50


def batch_of(n, **overrides):
    fields = dict(temperature=torch.ones(n), top_p=torch.ones(n), top_k=torch.full((n,), V),
                  min_p=torch.zeros(n), is_greedy=torch.zeros(n, dtype=torch.bool), generators=[None] * n)
    fields.update(overrides)
    return SamplingBatch(**fields)


@pytest.fixture
def logits():
    return torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3


def same(a, b):
    return torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)])


def test_repetition_penalty_equals_transformers(logits):
    ids = torch.tensor([[1, 2, 3, 3], [4, 5, 6, 7], [0, 0, 0, 0], [10, 20, 30, 49]])
    seen = torch.zeros(4, V, dtype=torch.bool).scatter_(1, ids, True)
    ours = apply_repetition_penalty(logits, seen, torch.full((4,), 1.3))
    assert same(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_equals_transformers(logits, k):
    filtered = top_k_top_p_torch(logits, torch.full((4,), k), torch.ones(4))
    assert same(filtered, TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_equals_transformers(logits, p):
    filtered = top_k_top_p_torch(logits, torch.full((4,), V), torch.full((4,), p))
    assert same(filtered, TopPLogitsWarper(p)(None, logits.clone()))


def test_per_row_top_k_then_top_p_equals_transformers_row_by_row(logits):
    """The sampler's filter op with a different k and p on each row (k = V and p = 1: off)."""
    ks, ps = [1, 7, V, 20], [0.5, 0.9, 0.3, 1.0]
    filtered = top_k_top_p_torch(logits, torch.tensor(ks), torch.tensor(ps))
    for row, (k, p) in enumerate(zip(ks, ps)):
        expected = logits[row:row + 1].clone()
        if k < V:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1:
            expected = TopPLogitsWarper(p)(None, expected)
        assert same(filtered[row:row + 1], expected), row


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_min_p_equals_transformers(logits, p):
    assert same(apply_min_p(logits, torch.full((4,), p)), MinPLogitsWarper(p)(None, logits.clone()))


def test_full_chain_equals_transformers_in_order(logits):
    ids = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    seen = torch.zeros(4, V, dtype=torch.bool).scatter_(1, ids, True)
    batch = batch_of(4, temperature=torch.full((4,), 0.7), top_k=torch.full((4,), 20), top_p=torch.full((4,), 0.8),
                     min_p=torch.full((4,), 0.02), repetition_penalty=torch.full((4,), 1.2),
                     presence_penalty=torch.zeros(4), frequency_penalty=torch.zeros(4), seen_mask=seen,
                     output_counts=torch.zeros(4, V))
    expected = logits.clone()
    for processor in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                      TopPLogitsWarper(0.8), MinPLogitsWarper(0.02)):
        expected = processor(ids, expected)
    assert same(process_logits(logits, batch), expected)


def test_presence_and_frequency_penalties_follow_openai(logits):
    counts = torch.zeros(4, V)
    counts[0, 3] = 2
    counts[1, 7] = 1
    out = apply_presence_frequency(logits, counts, torch.full((4,), 0.5), torch.full((4,), 0.25))
    assert out[0, 3] == pytest.approx(float(logits[0, 3]) - 0.5 - 0.5)
    assert out[1, 7] == pytest.approx(float(logits[1, 7]) - 0.5 - 0.25)
    assert torch.equal(out[2], logits[2])


def test_greedy_rows_take_the_argmax_and_top_k_1_is_greedy(logits):
    greedy = batch_of(4, is_greedy=torch.ones(4, dtype=torch.bool))
    tokens, _, _ = sample(logits, greedy)
    assert torch.equal(tokens, logits.argmax(-1))
    top1 = batch_of(4, top_k=torch.ones(4, dtype=torch.long))
    tokens, _, _ = sample(logits, top1)
    assert torch.equal(tokens, logits.argmax(-1))


def test_seeded_rows_reproduce_whatever_shares_the_batch(logits):
    flat = torch.zeros(1, V)  # uniform: every draw is pure randomness

    def draws(seed, busy):
        generator = torch.Generator().manual_seed(seed)
        rows = torch.cat([flat, logits[:3]]) if busy else flat
        gens = [generator, None, None, None] if busy else [generator]
        return [sample(rows, batch_of(len(gens), generators=gens))[0][0].item() for _ in range(20)]

    assert draws(42, busy=False) == draws(42, busy=True)
    assert draws(42, busy=False) != draws(7, busy=False)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    batch = batch_of(1)
    batch.top_k = torch.tensor([3])
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, batch)[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_banned_tokens_never_come_out(logits):
    banned = torch.zeros(4, V, dtype=torch.bool)
    banned[:, logits[0].argmax()] = True
    batch = batch_of(4, is_greedy=torch.ones(4, dtype=torch.bool), banned=banned)
    assert sample(logits, batch)[0][0] != logits[0].argmax()


def test_logprobs_are_the_raw_log_softmax(logits):
    batch = batch_of(4, is_greedy=torch.ones(4, dtype=torch.bool), needs_logprobs=True, top_logprobs=3)
    tokens, chosen, top = sample(logits, batch)
    expected = logits.log_softmax(-1)
    assert torch.allclose(chosen, expected.gather(1, tokens[:, None]).squeeze(1))
    assert torch.equal(top.indices[:, 0], tokens)


# -- per-request masks and biases (logit_bias, allowed_token_ids, the output grammar) -------------------

def bitmask_of(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    words = (vocab + 31) // 32
    bits = torch.zeros(len(allowed), words, dtype=torch.int64)
    for row, ids in enumerate(allowed):
        for i in ids:
            bits[row, i // 32] |= 1 << (i % 32)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # bit 31 is the sign bit


def test_unpack_bitmask_reads_every_bit():
    allowed = [[0, 31, 32, 49], [5], list(range(V))]
    unpacked = unpack_bitmask(bitmask_of(allowed, V), V)
    for row, ids in enumerate(allowed):
        assert unpacked[row].nonzero().flatten().tolist() == ids


def test_masks_and_biases_touch_only_their_rows(logits):
    plain = process_logits(logits, batch_of(4))
    batch = batch_of(4, grammar=(torch.tensor([1]), bitmask_of([[3, 7]], V)),
                     allowed=(torch.tensor([3]), torch.zeros(1, V, dtype=torch.bool).index_fill_(1, torch.tensor([9]),
                                                                                                  True)),
                     bias=(torch.tensor([2, 2]), torch.tensor([4, 5]), torch.tensor([100.0, -100.0])))
    ruled = process_logits(logits, batch)
    assert torch.equal(ruled[0], plain[0])  # a row without rules pays nothing and changes in no bit
    assert torch.isfinite(ruled[1]).nonzero().flatten().tolist() == [3, 7]
    assert torch.isfinite(ruled[3]).nonzero().flatten().tolist() == [9]
    assert ruled[2, 4] == logits[2, 4] + 100 and ruled[2, 5] == logits[2, 5] - 100
    tokens, _, _ = sample(logits, batch)
    assert tokens[2] == 4 and tokens[1] in (3, 7) and tokens[3] == 9
