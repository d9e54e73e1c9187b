"""Structured outputs at the edge: the request fields of every face -> one sampling_params.Constraint.

OpenAI's `response_format` (json_object, json_schema with `strict`), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs`, and LightLLM's
`guided_json`, `regular_constraint`, `guided_grammar`. A request names at most one; the manager
compiles it before submitting (common/grammar.py), so that a bad one is a 400 naming the problem.
"""

import json
from typing import Any

from lightvlm.sampling_params import Constraint
from lightvlm.server.httpserver.manager import ClientError

SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> subschema
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def strict_schema(schema: Any) -> Any:
    """OpenAI's strict mode: every object schema without `additionalProperties` gets
    `additionalProperties: false` (OpenAI requires strict schemas to say so; we make it so)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(sub) for sub in out[key]]
    for key in SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def schema_text(schema: Any, field: str, strict: bool = False) -> str:
    """A JSON schema given as an object or as JSON text -> JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ClientError(f"{field} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ClientError(f"{field} must be a JSON schema (an object), got {type(schema).__name__}")
    return json.dumps(strict_schema(schema) if strict else schema, ensure_ascii=False)


def choice_text(choices: Any, field: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ClientError(f"{field} must be a non-empty list of strings")
    return json.dumps(choices, ensure_ascii=False)


def pick_one(candidates: dict[str, Constraint | None]) -> Constraint | None:
    """The one constraint a request names; two or more is a 400 naming them."""
    given = {name: c for name, c in candidates.items() if c is not None}
    if len(given) > 1:
        raise ClientError(f"give at most one output constraint; this request has {', '.join(sorted(given))}")
    return next(iter(given.values()), None)


def guided_constraints(prefix: str, json_schema=None, regex=None, choice=None, grammar=None) -> dict:
    """vLLM's guided_* (prefix "guided_") or structured_outputs.* fields -> named candidates."""
    return {
        f"{prefix}json": None if json_schema is None else Constraint("json_schema",
                                                                     schema_text(json_schema, f"{prefix}json")),
        f"{prefix}regex": None if regex is None else Constraint("regex", regex),
        f"{prefix}choice": None if choice is None else Constraint("choice", choice_text(choice, f"{prefix}choice")),
        f"{prefix}grammar": None if grammar is None else Constraint("grammar", grammar),
    }
