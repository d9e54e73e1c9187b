"""Incremental ids -> text, and stop strings.

Text is decoded over a short window of recent ids (the prefix-offset method of TGI and vLLM): the
delta is the window's text minus the text of its earlier part, and nothing is emitted while the
newest bytes are an incomplete UTF-8 sequence. Stop strings are searched in the text; the text stops
right before the first match, and text that could still turn out to be the start of a stop string is
held back, so a stream never shows part of one.
"""

from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"


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
        before = len(s.text)
        s.text += self._decode_delta(s)
        if s.stop_sequences and len(s.ids) > s.min_new_tokens:
            # only matches that end in the new text: a stop string completed while checking was off
            # (before min_new_tokens) does not count later
            found = (s.text.find(stop, max(0, before - len(stop) + 1)) for stop in s.stop_sequences)
            cut = min((i for i in found if i >= 0), default=-1)
            if cut >= 0:
                s.text, s.stopped = s.text[:cut], True
                return self._take(s, len(s.text)), True
        return self._take(s, len(s.text) - self._held_back(s)), False

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
    def _held_back(s: DecodeState) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in s.stop_sequences:
            for size in range(min(len(stop) - 1, len(s.text)), longest, -1):
                if s.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    @staticmethod
    def _take(s: DecodeState, upto: int) -> str:
        upto = max(upto, s.emitted)
        piece, s.emitted = s.text[s.emitted:upto], upto
        return piece
