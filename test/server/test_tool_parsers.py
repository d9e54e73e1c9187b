"""Tool-call parsers: whole texts, streams cut anywhere (the deltas add up to the same calls), and the
grammar that forces a call."""

import json
import random

import pytest

from lightvlm.common.grammar import GrammarCompiler, GrammarError
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.server.httpserver.tool_parsers import TOOL_PARSERS, ToolStream

HERMES = TOOL_PARSERS["hermes"]
INTERNLM = TOOL_PARSERS["internlm"]
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}

HERMES_TEXT = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
INTERNLM_TEXT = ('Sure<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}'
                 '<|action_end|>')


def test_hermes_text_gives_content_and_calls():
    content, calls = HERMES.parse(HERMES_TEXT)
    assert content == "Let me look."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Pa}ris", "days": 3}, {}]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_text_without_calls_stays_content():
    assert HERMES.parse("Just words, <tool_call> nothing</tool_call> here") == (
        "Just words, <tool_call> nothing</tool_call> here", [])
    assert HERMES.parse("") == (None, [])


def test_internlm_text_gives_calls_with_parameters():
    content, calls = INTERNLM.parse(INTERNLM_TEXT)
    assert content == "Sure" and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Oslo", "days": 1}


def replay(parser, pieces):
    """Feed a stream; return (content, [(name, arguments text)]) as a client adds up the deltas."""
    stream, deltas = ToolStream(parser), []
    for piece in pieces:
        deltas += stream.feed(piece)
    deltas += stream.finish()
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": None, "arguments": "", "id": None})
            function = call.get("function", {})
            if "name" in function:
                assert entry["name"] is None, "a call's name is sent once"
                entry["name"], entry["id"] = function["name"], call["id"]
            entry["arguments"] += function.get("arguments", "")
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], stream.num_calls


def partitions(text: str, rng: random.Random):
    """The text whole, one character at a time, and cut at random places."""
    yield [text]
    yield list(text)
    for k in (3, 9, 25):
        points = sorted(rng.sample(range(1, len(text)), k))
        yield [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


@pytest.mark.parametrize("parser, text", [(HERMES, HERMES_TEXT), (INTERNLM, INTERNLM_TEXT)])
def test_streamed_deltas_add_up_to_the_calls_however_the_text_is_cut(parser, text):
    expected_content, expected = parser.parse(text)
    for pieces in partitions(text, random.Random(0)):
        content, calls, num_calls = replay(parser, pieces)
        assert content.strip() == expected_content
        assert [name for name, _ in calls] == [c.name for c in expected] and num_calls == len(expected)
        assert [json.loads(args) for _, args in calls] == [json.loads(c.arguments) for c in expected]


def test_plain_text_streams_through_unchanged():
    text = "No tools <here>, only text < and more"
    content, calls, _ = replay(HERMES, list(text))
    assert content == text and calls == []


@pytest.fixture(scope="module")
def compiler(tiny_qwen2):
    ckpt = LoadedCheckpoint.open(tiny_qwen2)
    return GrammarCompiler(ckpt.processor.tokenizer, ckpt.config.text.vocab_size, ckpt.eos_token_ids), \
        ckpt.processor.tokenizer


def test_the_forcing_grammar_accepts_calls_of_the_given_functions_only(compiler):
    grammars, tokenizer = compiler
    one = HERMES.grammar([WEATHER], parallel=False)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'

    def accepts(constraint, text):
        matcher = grammars.matcher(constraint.kind, constraint.value)
        return matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) and \
            matcher.is_accepting()

    assert accepts(one, call)
    assert not accepts(one, call.replace("get_weather", "get_time"))
    assert not accepts(one, call.replace('"days": 2', '"days": 9'))  # the function's own schema holds
    assert not accepts(one, call + "\n" + call)  # one call only
    both = HERMES.grammar([WEATHER, TIME], parallel=True)
    second = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert accepts(both, call + "\n" + second)


def test_a_format_whose_tags_the_tokenizer_lacks_is_refused_by_name(compiler):
    grammars, _ = compiler
    constraint = INTERNLM.grammar([WEATHER], parallel=False)
    with pytest.raises(GrammarError, match="action_start"):
        grammars.check(constraint.kind, constraint.value)
