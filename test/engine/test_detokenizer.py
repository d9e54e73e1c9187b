"""Incremental decoding equals a full decode; stop strings cut the text and never show in part."""

import pytest
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
