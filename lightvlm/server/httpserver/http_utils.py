"""What both faces of the httpserver do with a request body: read it as JSON and validate it against a
pydantic model, with one message per problem that names the field."""

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from lightvlm.server.httpserver.manager import ClientError


async def read_json(request: web.Request) -> Any:
    body = await request.read()  # aiohttp raises 413 past client_max_size
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClientError(f"the body is not valid JSON: {e}") from None


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
