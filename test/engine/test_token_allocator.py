import random

import pytest

from lightvlm.engine.token_allocator import TokenAllocator


def test_randomized_alloc_free_keeps_integrity():
    rng = random.Random(0)
    allocator = TokenAllocator(512)
    owned: list[list[int]] = []
    for _ in range(2000):
        if owned and (rng.random() < 0.45 or not allocator.can_alloc(1)):
            allocator.free(owned.pop(rng.randrange(len(owned))))
        else:
            n = rng.randint(1, 40)
            if allocator.can_alloc(n):
                slots = allocator.alloc(n)
                assert len(slots) == n
                owned.append(slots)
            else:
                with pytest.raises(MemoryError):
                    allocator.alloc(n)
        allocator.check_integrity()
        held = [s for slots in owned for s in slots]
        assert len(held) == len(set(held)) == allocator.num_used
    for slots in owned:
        allocator.free(slots)
    allocator.check_integrity()
    assert allocator.num_free == 512


def test_double_free_is_refused():
    allocator = TokenAllocator(8)
    slots = allocator.alloc(3)
    allocator.free(slots)
    with pytest.raises(ValueError, match="freed twice"):
        allocator.free(slots[:1])
    allocator.check_integrity()
