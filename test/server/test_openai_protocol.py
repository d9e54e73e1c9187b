"""The OpenAI request models: every field documented, extras refused or logged, strict schemas."""

import logging
import re
from pathlib import Path

import pytest

from lightvlm.server.httpserver.manager import ClientError
from lightvlm.server.httpserver.openai_protocol import (
    IGNORED,
    UNSUPPORTED,
    ChatRequest,
    CompletionRequest,
    check_extras,
)
from lightvlm.server.httpserver.structured import strict_schema

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_every_field_is_in_the_protocol_table():
    documented = set(re.findall(r"`([a-z_]+)", PROTOCOL.read_text()))
    fields = {f.alias or name for model in (ChatRequest, CompletionRequest) for name, f in model.model_fields.items()}
    missing = sorted((fields | set(UNSUPPORTED) | set(IGNORED)) - documented)
    assert not missing, f"docs/protocol.md does not say what happens to {missing}"


def test_extras_set_to_what_lightvlm_cannot_do_are_refused(caplog):
    check_extras({"use_beam_search": False, "suffix": "", "priority": 0, "modalities": ["text"]})  # no-ops
    with pytest.raises(ClientError, match="'suffix': suffix is not supported"):
        check_extras({"suffix": "!"})
    with pytest.raises(ClientError, match="'guided_decoding_backend'"):
        check_extras({"guided_decoding_backend": "xgrammar"})
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            check_extras({"an_unheard_of_field": 1, "store": True})
    assert sum("an_unheard_of_field" in r.getMessage() for r in caplog.records) == 1
    assert any("'store' (as vLLM does)" in r.getMessage() for r in caplog.records)


def test_strict_schema_closes_every_object_and_only_objects():
    schema = {"type": "object", "properties": {
        "properties": {"type": "string"},  # a property named like the keyword stays a property
        "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "items": {"type": "array", "items": {"type": "object", "properties": {}}},
        "open": {"type": "object", "additionalProperties": True}},
        "$defs": {"d": {"properties": {"y": {"enum": [{"type": "object"}]}}}}}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["inner"]["additionalProperties"] is False
    assert strict["properties"]["items"]["items"]["additionalProperties"] is False
    assert strict["properties"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in strict["properties"]["properties"]
    assert strict["$defs"]["d"]["additionalProperties"] is False
    assert strict["$defs"]["d"]["properties"]["y"]["enum"] == [{"type": "object"}]  # values are values
    assert "additionalProperties" not in schema  # the request's own schema is not changed
