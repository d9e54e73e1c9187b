"""Incremental decoding equals a full decode; stop strings cut the text and never show in part."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lightvlm.engine.detokenizer import Detokenizer

TEXT = "héllo 猫坐在桌子上. The cat sat on the mat, and the coffee is hot!"


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    return AutoTokenizer.from_pretrained(tiny_qwen2)


def stream(detokenizer, req_id, ids):
    pieces = [detokenizer.push(req_id, t)[0] for t in ids]
    return pieces, detokenizer.flush(req_id)


def test_incremental_text_equals_full_decode(tokenizer):
    ids = tokenizer(TEXT + "<|im_end|>")["input_ids"]
    for skip in (True, False):
        detokenizer = Detokenizer(tokenizer)
        detokenizer.add(0, skip_special_tokens=skip)
        pieces, tail = stream(detokenizer, 0, ids)
        assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=skip)
        assert "\ufffd" not in "".join(pieces)  # partial UTF-8 is held, never shown


def test_random_ids_still_add_up(tokenizer):
    import random

    ids = [random.Random(3).randrange(len(tokenizer)) for _ in range(200)]
    detokenizer = Detokenizer(tokenizer)
    detokenizer.add(0)
    pieces, tail = stream(detokenizer, 0, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_before_the_match_and_is_never_partly_emitted(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    detokenizer.add(0, stop_sequences=[" on the mat", "zzz"])
    shown, stopped_at = "", None
    for i, token in enumerate(ids):
        piece, stopped = detokenizer.push(0, token)
        shown += piece
        assert " on the" not in shown  # a prefix of the stop string was held back, not streamed
        if stopped:
            stopped_at = i
            break
    assert stopped_at is not None
    assert shown + detokenizer.flush(0) == TEXT[:TEXT.index(" on the mat")]


def test_stop_string_with_a_leading_space(tokenizer):
    ids = tokenizer("The cat sat. The end")["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    detokenizer.add(0, stop_sequences=[" The end"])
    text = "".join(detokenizer.push(0, t)[0] for t in ids) + detokenizer.flush(0)
    assert text == "The cat sat."


def test_held_back_text_is_released_when_it_does_not_become_a_stop(tokenizer):
    ids = tokenizer("The cat is on the table.")["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    detokenizer.add(0, stop_sequences=[" on the mat"])
    text = "".join(detokenizer.push(0, t)[0] for t in ids) + detokenizer.flush(0)
    assert text == "The cat is on the table."


def test_a_stop_string_completed_before_min_new_tokens_does_not_stop_later(tokenizer):
    ids = tokenizer("ab cd ab")["input_ids"]
    detokenizer = Detokenizer(tokenizer)
    detokenizer.add(0, stop_sequences=["ab"], min_new_tokens=len(tokenizer("ab cd")["input_ids"]))
    pushes = [detokenizer.push(0, t) for t in ids]
    assert [stopped for _, stopped in pushes][-1] is True  # the second "ab" stops
    assert not any(stopped for _, stopped in pushes[:-1])
    assert "".join(text for text, _ in pushes) == "ab cd "


class ChunkTokenizer:
    """Token id i decodes to chunks[i]: lets a test choose exactly how the text arrives."""

    def __init__(self, chunks):
        self.chunks = chunks

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chunks[i] for i in ids)


def reference_cut(text, stops):
    """Brute force: the text before the stop string that ends first (the longest if several end there)."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if text.endswith(stop, 0, end)]
        if ending:
            return text[:end - max(map(len, ending))]
    return None


def reference_held(text, stops):
    """Brute force: the longest tail of the text that is a proper prefix of a stop string."""
    return max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)


def feed(chunks, stops, min_new_tokens=0):
    detokenizer = Detokenizer(ChunkTokenizer(chunks))
    detokenizer.add(0, stop_sequences=stops, min_new_tokens=min_new_tokens)
    shown = ""
    for i in range(len(chunks)):
        piece, stopped = detokenizer.push(0, i)
        shown += piece
        if stopped:
            return shown, True, detokenizer
    return shown, False, detokenizer


def test_overlapping_stop_strings_the_one_ending_first_wins():
    assert feed(["abcd"], ["abcd", "bc"])[:2] == ("a", True)
    assert feed(["a", "b", "c", "d"], ["abcd", "bc"])[:2] == ("a", True)
    assert feed(["xabcd"], ["abcd", "bcd"])[:2] == ("x", True)  # both end at "d": the longer one cuts


def test_stop_string_split_across_tokens_is_held_back_then_cut():
    detokenizer = Detokenizer(ChunkTokenizer(["he said ", "ST", "O", "P now"]))
    detokenizer.add(0, stop_sequences=["STOP"])
    pushes = [detokenizer.push(0, i) for i in range(4)]
    assert pushes == [("he said ", False), ("", False), ("", False), ("", True)]
    assert detokenizer.flush(0) == ""


def test_many_stop_strings_are_matched():
    stops = [f"stop{i:05d}" for i in range(20000)]
    assert feed(["abc stop1", "2345 rest"], stops)[:2] == ("abc ", True)


alphabet = st.text(alphabet="abc", min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(alphabet, min_size=1, max_size=6), chunks=st.lists(st.text(alphabet="abc", max_size=4),
                                                                          max_size=12))
def test_stop_matching_equals_brute_force_in_any_chunking(stops, chunks):
    text = "".join(chunks)
    shown, stopped, detokenizer = feed(chunks, stops)
    cut = reference_cut(text, stops)
    assert stopped == (cut is not None)
    if stopped:
        assert shown + detokenizer.flush(0) == cut
    else:
        assert shown == text[:len(text) - reference_held(text, stops)]
        assert shown + detokenizer.flush(0) == text


@settings(max_examples=200, deadline=None)
@given(stops=st.lists(alphabet, min_size=1, max_size=4), chunks=st.lists(st.text(alphabet="abc", max_size=3),
                                                                          max_size=10),
       min_new_tokens=st.integers(0, 10))
def test_min_new_tokens_counts_only_matches_ending_in_later_tokens(stops, chunks, min_new_tokens):
    shown, stopped, detokenizer = feed(chunks, stops, min_new_tokens)
    before = "".join(chunks[:min_new_tokens])
    later = chunks[min_new_tokens:]
    expected = None
    for i in range(len(later)):  # the first later token in which a stop string ends, brute force
        text = before + "".join(later[:i + 1])
        start = len(text) - len(later[i])
        ends = [end for end in range(start + 1, len(text) + 1) if any(text.endswith(s, 0, end) for s in stops)]
        if ends:
            longest = max(len(s) for s in stops if text.endswith(s, 0, ends[0]))
            expected = text[:ends[0] - longest]
            break
    assert stopped == (expected is not None)
    if stopped:
        assert shown + detokenizer.flush(0) == expected
