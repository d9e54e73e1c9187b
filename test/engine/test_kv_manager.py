from hypothesis import given, settings
from hypothesis import strategies as st

from lightvlm.common.identity import placeholder_id
from lightvlm.engine.kv_manager import KVManager, cache_keys
from lightvlm.engine.token_allocator import TokenAllocator


class Model:
    """Requests driving the manager, and a fake KV buffer that says which prefix each slot holds."""

    def __init__(self, num_slots: int):
        self.kv = KVManager(TokenAllocator(num_slots))
        self.buffer: dict[int, tuple] = {}
        self.reqs: list[dict] = []

    def admit(self, keys: list) -> bool:
        num_cached, slots, handle = self.kv.match(keys[:-1])
        assert num_cached < len(keys)
        for i, s in enumerate(slots):
            assert self.buffer[s] == tuple(keys[:i + 1]), "a cached slot holds another prefix's KV"
        n = len(keys) - num_cached
        if not self.kv.can_alloc(n):
            self.kv.release(handle)
            return False
        own = self.kv.alloc(n)
        for i, s in enumerate(own, start=num_cached):
            self.buffer[s] = tuple(keys[:i + 1])  # the worker computes only these
        self.reqs.append({"keys": keys, "slots": slots + own, "num_tree": num_cached, "handle": handle, "dups": []})
        return True

    def insert(self, req: dict, k: int) -> None:
        k = max(k, req["num_tree"])
        handle, dups = self.kv.insert(req["keys"][:k], req["slots"][:k])
        self.kv.release(req["handle"])
        req["dups"] = sorted(set(req["dups"]) | set(dups))  # the request still reads its own copies
        req.update(num_tree=k, handle=handle)

    def finish(self, req: dict) -> None:
        self.reqs.remove(req)
        self.kv.release(req["handle"])
        self.kv.free(req["dups"] + req["slots"][req["num_tree"]:])

    def check(self) -> None:
        self.kv.check_integrity(r["dups"] + r["slots"][r["num_tree"]:] for r in self.reqs)
        for r in self.reqs:
            for i, s in enumerate(r["slots"]):
                assert self.buffer[s] == tuple(r["keys"][:i + 1]), "a held slot was reused"
            _, slots, handle = self.kv.match(r["keys"][:r["num_tree"]])  # the tree holds what it was given
            self.kv.release(handle)
            assert len(slots) >= r["num_tree"]
            for i, s in enumerate(slots):
                assert self.buffer[s] == tuple(r["keys"][:i + 1])


prompts = st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=4).flatmap(
    lambda prefix: st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=6).map(lambda s: prefix + s))
steps = st.lists(st.tuples(st.sampled_from(["admit", "insert", "finish", "evict"]), prompts,
                           st.integers(0, 1000)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_random_match_insert_release_evict_keeps_integrity(ops):
    m = Model(24)
    for op, keys, r in ops:
        if op == "admit":
            m.admit(keys)
        elif op == "insert" and m.reqs:
            req = m.reqs[r % len(m.reqs)]
            m.insert(req, r % (len(req["keys"]) + 1))
        elif op == "finish" and m.reqs:
            req = m.reqs[r % len(m.reqs)]
            m.insert(req, len(req["keys"]))
            m.finish(req)
        elif op == "evict":
            m.kv.evict(r % 10)
        m.check()
    for req in list(m.reqs):
        m.finish(req)
    m.check()
    assert m.kv.root.refcount == 0
    m.kv.evict(24)
    assert m.kv.allocator.num_free == 24


def test_second_request_matches_the_first_ones_prompt_but_its_last_token():
    m = Model(64)
    assert m.admit([5, 6, 7, 8])
    m.insert(m.reqs[0], 4)
    m.finish(m.reqs[0])
    num_cached, _, handle = m.kv.match([5, 6, 7, 8, 9][:-1])
    assert num_cached == 4
    m.kv.release(handle)
    num_cached, _, handle = m.kv.match([5, 6, 1])
    assert num_cached == 2
    m.kv.release(handle)
    m.check()


def test_duplicate_slots_stay_with_the_request_until_it_ends():
    m = Model(16)
    assert m.admit([1, 2, 3]) and m.admit([1, 2, 3])  # both computed everything: nothing inserted yet
    assert m.kv.allocator.num_free == 16 - 6
    for req in list(m.reqs):
        m.insert(req, 3)
    assert m.kv.allocator.num_free == 16 - 6 and m.kv.num_tree_slots == 3
    for req in list(m.reqs):
        m.finish(req)
    assert m.kv.allocator.num_free == 16 - 3 and m.kv.num_tree_slots == 3
    m.check()


def test_eviction_takes_unreferenced_leaves_least_recently_used_first():
    m = Model(8)
    for keys in ([1, 1, 1, 1], [2, 2, 2, 2]):
        assert m.admit(keys)
        m.insert(m.reqs[-1], 4)
        m.finish(m.reqs[-1])
    _, _, handle = m.kv.match([1, 1, 1, 1])  # uses [1, ...] more recently
    m.kv.release(handle)
    assert m.kv.allocator.num_free == 0
    assert m.admit([3, 3])  # evicts the [2, ...] branch
    assert m.kv.match([2, 2, 2, 2])[0] == 0 and m.kv.match([1, 1, 1, 1])[0] == 4
    assert m.kv.num_evicted_tokens == 4


def test_referenced_prefix_is_never_evicted():
    m = Model(6)
    assert m.admit([1, 2, 3, 4])
    m.insert(m.reqs[0], 4)
    assert not m.admit([9, 9, 9])  # the running request's 4 slots cannot go
    assert m.kv.evict(10) == 0
    m.check()


def test_image_rows_are_keyed_by_image_and_row():
    a, b = placeholder_id("a" * 32), placeholder_id("b" * 32)
    assert cache_keys([7, a, a, a, 8]) == [7, (a, 0), (a, 1), (a, 2), 8]
    m = Model(64)
    assert m.admit(cache_keys([7, a, a, a, 8, 9]))
    m.insert(m.reqs[0], 6)
    assert m.kv.match(cache_keys([7, a, a, a, 8, 1]))[0] == 5  # the same image: the whole span
    assert m.kv.match(cache_keys([7, b, b, b, 8, 9]))[0] == 1  # another image: nothing past the text
