"""What both faces of the httpserver do with a request body: read it as JSON (nesting bounded, text
checked for unpaired surrogates) and validate it against a pydantic model, with one message per problem
that names the field."""

import asyncio
import json
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from lightvlm.config import HttpConfig
from lightvlm.server.httpserver.manager import ClientError

BODY_TIMEOUT = web.AppKey("body_timeout", float)  # set by build_app from --http_body_timeout
MAX_JSON_DEPTH = 64  # deeper bodies are refused before json.loads, whose recursion they would exhaust
_STRUCTURE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)  # an escape (two bytes), a quote or a bracket


def json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of `[`/`{` outside strings, counted up to limit + 1: one linear scan that only
    stops at quotes, escapes and brackets (a base64 image has none of them, so it costs a regex pass)."""
    depth = deepest = 0
    in_string = False
    for match in _STRUCTURE.finditer(body):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:  # a bracket inside a string, or an escape (\" does not end one)
            continue
        elif token in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        else:
            depth -= 1
    return deepest


class BodyTooSlow(ClientError):
    status = 408


def too_deep() -> ClientError:
    return ClientError(f"the body nests arrays/objects deeper than the limit of {MAX_JSON_DEPTH} levels")


def loads(body: bytes) -> Any:
    """The one parse of a request body: a ClientError (400) for invalid JSON, nesting deeper than
    MAX_JSON_DEPTH, or text with an unpaired surrogate."""
    few_brackets = body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH  # the common case, at C speed
    if not few_brackets and json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep()
    try:
        data = json.loads(body)
    except RecursionError:
        raise too_deep() from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClientError(f"the body is not valid JSON: {e}") from None
    check_surrogates(data)
    return data


async def read_json(request: web.Request) -> Any:
    """The body as JSON: a 413 from Content-Length before any byte is read (aiohttp would wait for the
    bytes), a 408 past `--http_body_timeout` (a client that sends slowly holds a connection and a buffer)."""
    limit = request.app._client_max_size  # noqa: SLF001 (aiohttp keeps the limit only here)
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    seconds = request.app.get(BODY_TIMEOUT, HttpConfig.body_timeout)
    try:
        async with asyncio.timeout(seconds):
            body = await request.read()  # aiohttp raises 413 past client_max_size
    except TimeoutError:
        raise BodyTooSlow(f"the body did not arrive within {seconds:g} s "
                          f"(--http_body_timeout)") from None
    return loads(body)


def _where(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "the body"


def check_surrogates(data: Any, path: list | None = None) -> None:
    """Refuse any string (value or key) holding a lone UTF-16 surrogate (JSON "\\ud800"): it cannot be
    encoded as UTF-8, so no tokenizer can take it. Names the field and the character position."""
    path = [] if path is None else path
    if isinstance(data, str):
        if data.isascii():  # the fast path for base64 images and most text
            return
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ClientError(f"{_where(path)} contains an unpaired surrogate (U+{ord(data[e.start]):04X}) at "
                              f"character {e.start}; send valid Unicode text") from None
    elif isinstance(data, dict):
        for key, value in data.items():
            check_surrogates(key, [*path, f"<key {key.encode('utf-8', 'replace').decode()!r}>"])
            check_surrogates(value, [*path, key])
    elif isinstance(data, list):
        for i, value in enumerate(data):
            if isinstance(value, (str, list, dict)):  # a long list of token ids costs one pass
                check_surrogates(value, [*path, i])


def parse(model: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise ClientError(f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ClientError(validation_message(e)) from None


def validation_message(error: ValidationError) -> str:
    """One line per problem, naming the field: 'unknown parameter', 'wrong type', and so on."""
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown field '{where}'")
        elif item["type"] == "missing":
            problems.append(f"missing field '{where}'")
        else:
            problems.append(f"'{where}': {item['msg']} (got {item.get('input')!r:.60})")
    return "; ".join(problems)
