"""Incremental ids -> text, and stop strings.

Text is decoded over a short window of recent ids (the prefix-offset method of TGI and vLLM): the
delta is the window's text minus the text of its earlier part, and nothing is emitted while the
newest bytes are an incomplete UTF-8 sequence, so text once decoded never changes, it only grows.
Stop strings are found by an Aho-Corasick automaton that reads each new character once, so the cost
per token does not grow with the number of stop strings. The text stops right before the match that
ends first (the longest one where several end at the same character), and text that could still turn
out to be the start of a stop string is held back, so a stream never shows part of one.
"""

from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"


class StopMatcher:
    """Aho-Corasick automaton over one request's stop strings.

    A state is a node of the trie of the stop strings; after some text it stands for the longest
    suffix of that text that is a prefix of a stop string. Per node: `goto` (trie edges), `fail` (the
    node of its longest proper suffix that is also in the trie), `match` (length of the longest stop
    string ending here, 0 if none) and `held` (length of the longest suffix that is a proper prefix of
    some stop string: the text to hold back).
    """

    def __init__(self, stops):
        self.goto: list[dict[str, int]] = [{}]
        depth, self.match = [0], [0]
        for stop in stops:
            node = 0
            for char in stop:
                if char not in self.goto[node]:
                    self.goto[node][char] = len(self.goto)
                    self.goto.append({})
                    depth.append(depth[node] + 1)
                    self.match.append(0)
                node = self.goto[node][char]
            self.match[node] = len(stop)
        self.fail, self.held = [0] * len(self.goto), [0] * len(self.goto)
        order = list(self.goto[0].values())  # breadth first: a node's fail link is set before it is reached
        for node in order:
            suffix = self.fail[node]
            self.match[node] = self.match[node] or self.match[suffix]
            self.held[node] = depth[node] if self.goto[node] else self.held[suffix]
            for char, child in self.goto[node].items():
                self.fail[child] = self.step(suffix, char)
                order.append(child)

    def step(self, node: int, char: str) -> int:
        while node and char not in self.goto[node]:
            node = self.fail[node]
        return self.goto[node].get(char, 0)


@dataclass
class DecodeState:
    skip_special_tokens: bool = True
    stop_sequences: tuple[str, ...] = ()
    min_new_tokens: int = 0  # stop strings count only in tokens after this many
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # all decoded text so far (stop-string match removed once found)
    emitted: int = 0  # characters of `text` handed out
    stopped: bool = False  # a stop string matched
    matcher: StopMatcher | None = None  # built from stop_sequences
    node: int = 0  # matcher state after all of `text`

    def __post_init__(self):
        if self.stop_sequences and self.matcher is None:
            self.matcher = StopMatcher(self.stop_sequences)


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[int, DecodeState] = {}

    def add(self, req_id: int, skip_special_tokens: bool = True, stop_sequences=(), min_new_tokens: int = 0) -> None:
        self.states[req_id] = DecodeState(skip_special_tokens, tuple(stop_sequences), min_new_tokens)

    def remove(self, req_id: int) -> DecodeState | None:
        return self.states.pop(req_id, None)

    def push(self, req_id: int, token_id: int) -> tuple[str, bool]:
        """Add one generated id. Returns (text safe to show now, whether a stop string matched).

        Within the first min_new_tokens tokens, stop strings are not looked for.
        """
        s = self.states[req_id]
        if s.stopped:
            return "", True
        s.ids.append(token_id)
        delta = self._decode_delta(s)
        if s.matcher is None:
            s.text += delta
            return self._take(s, len(s.text)), False
        # only matches that end in the new text count: one completed while checking was off (before
        # min_new_tokens) does not stop the request later
        checking = len(s.ids) > s.min_new_tokens
        for end, char in enumerate(delta, len(s.text) + 1):
            s.node = s.matcher.step(s.node, char)
            if checking and s.matcher.match[s.node]:
                s.text = (s.text + delta)[:end - s.matcher.match[s.node]]
                s.stopped = True
                return self._take(s, len(s.text)), True
        s.text += delta
        return self._take(s, len(s.text) - s.matcher.held[s.node]), False

    def flush(self, req_id: int) -> str:
        """The request ended: everything not yet shown, incomplete characters included."""
        s = self.states[req_id]
        if not s.stopped:
            full = self.tokenizer.decode(s.ids[s.prefix_offset:], skip_special_tokens=s.skip_special_tokens)
            prefix = self.tokenizer.decode(s.ids[s.prefix_offset:s.read_offset],
                                           skip_special_tokens=s.skip_special_tokens)
            s.text += full[len(prefix):]
            s.read_offset = len(s.ids)
        return self._take(s, len(s.text))

    def _decode_delta(self, s: DecodeState) -> str:
        decode = self.tokenizer.decode
        prefix = decode(s.ids[s.prefix_offset:s.read_offset], skip_special_tokens=s.skip_special_tokens)
        full = decode(s.ids[s.prefix_offset:], skip_special_tokens=s.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            s.prefix_offset, s.read_offset = s.read_offset, len(s.ids)
            return full[len(prefix):]
        return ""

    @staticmethod
    def _take(s: DecodeState, upto: int) -> str:
        upto = max(upto, s.emitted)
        piece, s.emitted = s.text[s.emitted:upto], upto
        return piece
