"""Token-level KV slot allocator (LightLLM's TokenAttention): indices only, never a tensor.

Slot i addresses row i of every layer's K and V buffer in the model runner. A request owns the list of
slots its tokens were written to; they need not be contiguous.
"""


class TokenAllocator:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() hands out low indices first
        self._is_free = bytearray(b"\x01") * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV slots, {len(self._free)} free")
        slots = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        for s in slots:
            self._is_free[s] = 0
        return slots

    def free(self, slots: list[int]) -> None:
        for s in slots:
            if self._is_free[s]:
                raise ValueError(f"KV slot {s} freed twice")
            self._is_free[s] = 1
        self._free.extend(reversed(slots))

    def check_integrity(self) -> None:
        """Every slot is either free exactly once or owned; raises AssertionError otherwise."""
        assert len(self._free) == len(set(self._free)), "a slot is on the free list twice"
        assert all(0 <= s < self.num_slots for s in self._free), "a free slot is out of range"
        assert sum(self._is_free) == len(self._free), "free flags and free list disagree"
        assert all(self._is_free[s] for s in self._free), "a listed free slot is flagged as used"
