"""The embedding cache's policy: LRU over unreferenced entries, bounded by items and bytes."""

from lightvlm.visualserver.embed_cache import EmbedCache


class Segments:
    def __init__(self):
        self.live: dict[str, int] = {}
        self.destroyed: list[str] = []

    def create(self, key, nbytes):
        assert key not in self.live
        self.live[key] = nbytes

    def destroy(self, key):
        del self.live[key]
        self.destroyed.append(key)


def make(capacity=3, max_bytes=1000):
    segments = Segments()
    return EmbedCache(capacity, max_bytes, segments.create, segments.destroy), segments


def ready(cache, key, nbytes=100):
    entry = cache.insert(key, nbytes)
    entry.is_ready = True
    return entry


def test_hit_and_miss_counters():
    cache, _ = make()
    assert cache.acquire("a") is None
    ready(cache, "a")
    assert cache.acquire("a").refs == 2
    assert (cache.hits, cache.misses) == (1, 1)


def test_least_recently_used_unreferenced_entry_is_evicted_first():
    cache, segments = make(capacity=3)
    for key in "abc":
        ready(cache, key)
        cache.release(key)
    cache.acquire("a")  # a becomes most recent (and held)
    cache.release("a")
    ready(cache, "d")
    assert segments.destroyed == ["b"] and set(cache.entries) == {"a", "c", "d"}
    assert cache.evictions == 1


def test_entries_in_use_or_being_encoded_are_never_evicted():
    cache, segments = make(capacity=2)
    ready(cache, "held")  # referenced
    cache.insert("encoding", 100)  # not ready yet, released
    cache.release("encoding")
    assert cache.insert("new", 100) is None  # no room: nothing may go
    assert segments.destroyed == [] and len(cache) == 2


def test_byte_bound():
    cache, segments = make(capacity=10, max_bytes=250)
    ready(cache, "a", 100)
    cache.release("a")
    ready(cache, "b", 100)
    ready(cache, "c", 100)  # 300 > 250: a (free) goes
    assert segments.destroyed == ["a"] and cache.nbytes == 200
    assert cache.insert("d", 100) is None  # b and c are held


def test_requests_that_could_never_fit_are_named():
    cache, _ = make(capacity=2, max_bytes=1000)
    assert cache.can_ever_hold({"a": 10, "b": 10}) is None
    assert "3 distinct images but the cache holds 2" in cache.can_ever_hold({"a": 1, "b": 1, "c": 1})
    assert "2000 bytes" in cache.can_ever_hold({"a": 2000})


def test_remove_and_clear_destroy_segments():
    cache, segments = make()
    ready(cache, "a")
    cache.insert("b", 50)
    cache.remove("b")
    assert segments.destroyed == ["b"] and cache.nbytes == 100
    cache.clear()
    assert segments.live == {} and cache.nbytes == 0
