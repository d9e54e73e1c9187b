"""Prefix cache: a radix tree over token keys whose nodes own refcounted KV slots.

Policy only: pure Python, indices only, between the scheduler and the `TokenAllocator`. A node holds
the keys of one edge and the KV slot of each (one slot per token). Every running request that
matched or inserted a prefix holds a handle: the deepest node of that prefix. A node's refcount is
the number of handles at or below it, so a node with refcount 0 is referenced by no request and
may be evicted (leaves first, least recently used first) when the allocator runs short.

Slot ownership, what `check_integrity` asserts: every slot of the pool is exactly one of free (in
the allocator), in the tree, or owned by a request outside the tree (its uncached suffix).

Keys are what makes two tokens the same for the KV: the token id for text; for image rows
`(placeholder id, row index in the run)`, since every row of one image carries the same placeholder
id (64 bits of the image's key, see `lightvlm.common.identity`) but holds a different embedding.
"""

import heapq
import itertools
from collections.abc import Hashable, Iterable, Sequence

from lightvlm.common.identity import is_placeholder
from lightvlm.engine.token_allocator import TokenAllocator


def cache_keys(token_ids: Sequence[int]) -> list[Hashable]:
    """The radix key of each token: the id for text, (placeholder id, row) for image rows."""
    keys: list[Hashable] = []
    row = 0
    for i, tid in enumerate(token_ids):
        if is_placeholder(tid):
            row = row + 1 if i and token_ids[i - 1] == tid else 0
            keys.append((tid, row))
        else:
            keys.append(tid)
    return keys


class Node:
    __slots__ = ("parent", "children", "keys", "slots", "refcount", "last_access")

    def __init__(self, parent: "Node | None", keys: list, slots: list[int], last_access: int):
        self.parent = parent
        self.children: dict[Hashable, Node] = {}  # by the first key of the child's edge
        self.keys = keys
        self.slots = slots
        self.refcount = 0
        self.last_access = last_access

    @property
    def depth(self) -> int:
        """Tokens from the root through this node's edge."""
        n, node = 0, self
        while node is not None:
            n += len(node.keys)
            node = node.parent
        return n


class KVManager:
    """The radix tree and the allocator under it. Handles returned by `match` and `insert` must be
    given back with `release` exactly once; the slots they name stay valid until then."""

    def __init__(self, allocator: TokenAllocator):
        self.allocator = allocator
        self.root = Node(None, [], [], 0)
        self._clock = itertools.count(1)
        self._held: dict[Node, int] = {}  # handles given out, per node (for check_integrity)
        self.num_tree_slots = 0
        self.num_evicted_tokens = 0

    # -- lookup and insertion ------------------------------------------------------------------

    def match(self, keys: Sequence[Hashable]) -> tuple[int, list[int], Node]:
        """The longest cached prefix of `keys`: (its length, its slots, a handle that keeps it)."""
        node, slots = self._walk(keys)
        self._lock(node)
        return len(slots), slots, node

    def insert(self, keys: Sequence[Hashable], slots: Sequence[int]) -> tuple[Node, list[int]]:
        """Put a request's computed tokens in the tree; returns a handle and the duplicates: the
        request's slots for tokens the tree already held in other slots. The tree adopts the rest; the
        request keeps owning the duplicates (a running request's worker still reads them) and frees
        them when it ends. The caller releases its earlier handle after this, so the shared prefix is
        never unreferenced in between."""
        assert len(keys) == len(slots)
        node, have = self._walk(keys)
        duplicates = [s for s, t in zip(slots, have) if s != t]
        if len(have) < len(keys):
            child = Node(node, list(keys[len(have):]), list(slots[len(have):]), next(self._clock))
            node.children[child.keys[0]] = child
            self.num_tree_slots += len(child.slots)
            node = child
        self._lock(node)
        return node, duplicates

    def release(self, handle: Node) -> None:
        count = self._held[handle] - 1
        if count:
            self._held[handle] = count
        else:
            del self._held[handle]
        tick = next(self._clock)
        node = handle
        while node is not None:
            assert node.refcount > 0, "a handle was released twice"
            node.refcount -= 1
            node.last_access = tick
            node = node.parent

    # -- slots ---------------------------------------------------------------------------------

    @property
    def num_evictable(self) -> int:
        return sum(len(n.slots) for n in self._nodes() if n.refcount == 0)

    def can_alloc(self, n: int) -> bool:
        return n <= self.allocator.num_free + self.num_evictable

    def alloc(self, n: int) -> list[int]:
        """n slots for a request's own use, evicting unreferenced cached prefixes when short."""
        if n > self.allocator.num_free:
            self.evict(n - self.allocator.num_free)
        return self.allocator.alloc(n)

    def free(self, slots: list[int]) -> None:
        """Slots a request owns outside the tree (never slots a handle names)."""
        if slots:
            self.allocator.free(slots)

    def evict(self, n: int) -> int:
        """Free at least n slots from unreferenced leaves, least recently used first (fewer if the
        tree has fewer unreferenced); returns the number freed."""
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._nodes()
                if not leaf.children and leaf.refcount == 0 and leaf is not self.root]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.keys[0]]
            self.allocator.free(leaf.slots)
            freed += len(leaf.slots)
            self.num_tree_slots -= len(leaf.slots)
            if parent is not self.root and not parent.children and parent.refcount == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.num_evicted_tokens += freed
        return freed

    def check_integrity(self, request_slots: Iterable[Sequence[int]] = ()) -> None:
        """Tree slots + slots requests own outside the tree + free slots == the pool, no slot twice,
        and every refcount equals the handles at or below its node. `request_slots`: each running
        request's own (uncached) slots."""
        self.allocator.check_integrity()
        tree = [s for node in self._nodes() for s in node.slots]
        assert len(tree) == self.num_tree_slots, "tree slot count drifted"
        owned = [s for slots in request_slots for s in slots]
        free = self.allocator._free
        every = tree + owned + free
        assert len(every) == len(set(every)), "a KV slot is held twice"
        assert len(every) == self.allocator.num_slots, (
            f"{self.allocator.num_slots - len(every)} KV slots leaked")
        for node in self._nodes():
            assert len(node.keys) == len(node.slots), "a node's keys and slots disagree"
            below = self._held.get(node, 0) + sum(c.refcount for c in node.children.values())
            assert node.refcount == below, "a refcount disagrees with the handles held"
            for first, child in node.children.items():
                assert child.parent is node and child.keys and child.keys[0] == first

    # -- the tree ------------------------------------------------------------------------------

    def _walk(self, keys: Sequence[Hashable]) -> tuple[Node, list[int]]:
        """The deepest node whose path is a prefix of keys, splitting an edge where keys leave it."""
        node, slots, i = self.root, [], 0
        tick = next(self._clock)
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                break
            n = 0
            while n < len(child.keys) and i + n < len(keys) and child.keys[n] == keys[i + n]:
                n += 1
            if n < len(child.keys):
                child = self._split(child, n)
            child.last_access = tick
            slots.extend(child.slots)
            node, i = child, i + n
        return node, slots

    def _split(self, node: Node, n: int) -> Node:
        """Cut node's edge after n keys; returns the new upper node (same refcount: every path through
        the node passes through it)."""
        upper = Node(node.parent, node.keys[:n], node.slots[:n], node.last_access)
        upper.refcount = node.refcount
        node.parent.children[upper.keys[0]] = upper
        node.keys, node.slots, node.parent = node.keys[n:], node.slots[n:], upper
        upper.children[node.keys[0]] = node
        return upper

    def _lock(self, handle: Node) -> None:
        self._held[handle] = self._held.get(handle, 0) + 1
        node = handle
        while node is not None:
            node.refcount += 1
            node = node.parent

    def _nodes(self) -> Iterable[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
