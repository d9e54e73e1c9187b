"""The embedding cache: image key -> an entry in shared memory, LRU over entries nobody holds.

Bounded by entries (`capacity`) and by bytes (`max_bytes`). An entry a live request references, or
one still being encoded, is never evicted. Pure bookkeeping; the segments are created and unlinked
through the callbacks, so the policy can be tested without shared memory.
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Entry:
    key: str
    nbytes: int
    refs: int = 0
    is_ready: bool = False  # embeddings written
    waiters: set[int] = field(default_factory=set)  # requests waiting for it to be ready


class EmbedCache:
    def __init__(self, capacity: int, max_bytes: int, create: Callable[[str, int], None],
                 destroy: Callable[[str], None]):
        self.capacity, self.max_bytes = capacity, max_bytes
        self.create, self.destroy = create, destroy
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def can_ever_hold(self, sizes: dict[str, int]) -> str | None:
        """None if a request needing these entries (key -> bytes) fits in an empty cache, else why not."""
        if len(sizes) > self.capacity:
            return f"{len(sizes)} distinct images but the cache holds {self.capacity} (--cache_capacity)"
        total = sum(sizes.values())
        if total > self.max_bytes:
            return f"{total} bytes of image embeddings but the cache holds {self.max_bytes} (--cache_max_mb)"
        return None

    def acquire(self, key: str) -> Entry | None:
        """Reference an existing entry (a hit), moving it to the most recent end."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.refs += 1
            self.entries.move_to_end(key)
            self.hits += 1
        return entry

    def insert(self, key: str, nbytes: int) -> Entry | None:
        """Make room and create a referenced, not yet ready entry (a miss). None if held entries
        leave no room right now."""
        if not self._make_room(nbytes):
            return None
        self.create(key, nbytes)
        entry = self.entries[key] = Entry(key, nbytes, refs=1)
        self.nbytes += nbytes
        self.misses += 1
        return entry

    def release(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.refs > 0:
            entry.refs -= 1

    def remove(self, key: str) -> None:
        """Drop an entry at once (its encoding failed)."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
            self.destroy(key)

    def clear(self) -> None:
        for key in list(self.entries):
            self.remove(key)

    def _make_room(self, nbytes: int) -> bool:
        while len(self.entries) >= self.capacity or self.nbytes + nbytes > self.max_bytes:
            victim = next((e for e in self.entries.values() if e.refs == 0 and e.is_ready), None)
            if victim is None:
                return False
            self.remove(victim.key)
            self.evictions += 1
        return True
