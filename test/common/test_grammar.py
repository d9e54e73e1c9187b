"""Constraints compile once into llguidance grammars; bad ones fail with messages that name the problem."""

import json
import re

import pytest

from lightvlm.common.grammar import GrammarCompiler, GrammarError, ascii_regex
from lightvlm.models.checkpoint import LoadedCheckpoint


@pytest.fixture(scope="module")
def compiler(tiny_qwen2):
    ckpt = LoadedCheckpoint.open(tiny_qwen2)
    return GrammarCompiler(ckpt.processor.tokenizer, ckpt.config.text.vocab_size, ckpt.eos_token_ids)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    return LoadedCheckpoint.open(tiny_qwen2).processor.tokenizer


def accepts(compiler, tokenizer, kind, value, text) -> bool:
    matcher = compiler.matcher(kind, value)
    return matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) and matcher.is_accepting()


@pytest.mark.parametrize("regex, expected", [
    (r"\d{3}", "[0-9]{3}"),
    (r"[\d\w-]+", "[0-9A-Za-z0-9_-]+"),
    (r"\\d", r"\\d"),  # an escaped backslash, then a plain d
    (r"[]\d]", "[]0-9]"),
    (r"\D\s", r"\D\s"),
])
def test_ascii_regex_gives_digits_and_word_characters_their_ascii_meaning(regex, expected):
    assert ascii_regex(regex) == expected


def test_regex_digits_are_ascii(compiler, tokenizer):
    assert accepts(compiler, tokenizer, "regex", r"\d{3}-\d{2}", "123-45")
    assert not accepts(compiler, tokenizer, "regex", r"\d{3}-\d{2}", "١٢٣-45")  # Arabic-Indic digits


def test_json_schema_is_enforced_with_single_spaces(compiler, tokenizer):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                         "additionalProperties": False})
    assert accepts(compiler, tokenizer, "json_schema", schema, '{"a": 5}')
    assert not accepts(compiler, tokenizer, "json_schema", schema, '{"a":5}')  # whitespace is not free
    assert not accepts(compiler, tokenizer, "json_schema", schema, '{"a": 5, "b": 1}')
    assert accepts(compiler, tokenizer, "json_object", "", '{"anything": [1, 2]}')
    assert not accepts(compiler, tokenizer, "json_object", "", "[1, 2]")


def test_choice_and_grammar(compiler, tokenizer):
    choices = json.dumps(["yes", 'say "hi"'])
    assert accepts(compiler, tokenizer, "choice", choices, 'say "hi"')
    assert not accepts(compiler, tokenizer, "choice", choices, "no")
    lark = 'start: NUM ("+" NUM)*\nNUM: /[0-9]+/'
    assert accepts(compiler, tokenizer, "grammar", lark, "1+22")
    assert accepts(compiler, tokenizer, "grammar", 'root ::= "a" | "b"', "b")  # GBNF


@pytest.mark.parametrize("kind, value, message", [
    ("json_schema", '{"type": "foo"}', "Invalid type: foo"),
    ("json_schema", '{"type": "array", "uniqueItems": true}', "uniqueItems"),  # refused, not ignored
    ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}', "minimum"),
    ("json_schema", "{nope", "invalid json_schema"),
    ("regex", "(ab", "unclosed group"),
    ("grammar", "root ::= foo", "foo"),
    ("choice", "[]", "non-empty list"),
])
def test_bad_constraints_name_the_problem(compiler, kind, value, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        compiler.check(kind, value)


def test_a_grammar_compiles_once(compiler):
    schema = json.dumps({"type": "object", "properties": {"x": {"type": "boolean"}}})
    compiler.check("json_schema", schema)
    prototype = compiler._prototypes[("json_schema", schema)]
    first, second = compiler.matcher("json_schema", schema), compiler.matcher("json_schema", schema)
    assert compiler._prototypes[("json_schema", schema)] is prototype
    assert first is not second and first is not prototype  # each request its own copy
