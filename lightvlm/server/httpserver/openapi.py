"""The OpenAPI 3 document served at /openapi.json: both faces, their request bodies generated from the
pydantic models the handlers validate with, and the statuses docs/protocol.md promises, each with its
JSON error body. The fuzzing test (test/e2e/test_fuzz_openapi.py) sends what this document describes."""

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from lightvlm.server.httpserver.native_api import GenerateRequest, TokensRequest
from lightvlm.server.httpserver.openai_api import DetokenizeRequest, TokenizeRequest
from lightvlm.server.httpserver.openai_protocol import ChatRequest, CompletionRequest

# path -> (request model, what a 200 carries); a None model is a GET
NATIVE_ROUTES: dict[str, tuple[type[BaseModel] | None, str]] = {
    "/generate": (GenerateRequest, "application/json"),
    "/generate_stream": (GenerateRequest, "text/event-stream"),
    "/tokens": (TokensRequest, "application/json"),
    "/get_model_name": (None, "application/json"),
    "/token_load": (None, "application/json"),
    "/health": (None, "application/json"),
    "/readiness": (None, "application/json"),
    "/liveness": (None, "application/json"),
    "/metrics": (None, "text/plain"),
}
OPENAI_ROUTES: dict[str, tuple[type[BaseModel] | None, str]] = {
    "/v1/chat/completions": (ChatRequest, "application/json"),  # text/event-stream with "stream": true
    "/v1/completions": (CompletionRequest, "application/json"),
    "/tokenize": (TokenizeRequest, "application/json"),
    "/detokenize": (DetokenizeRequest, "application/json"),
    "/v1/models": (None, "application/json"),
    "/version": (None, "application/json"),
}
STREAMING = ("/generate_stream", "/v1/chat/completions", "/v1/completions")

ERROR_STATUSES = {  # what docs/protocol.md's Errors table says each status means
    "400": "invalid JSON, wrong types, bad parameter values, undecodable media, prompt too long",
    "401": "--api_key is set and the request lacks 'Authorization: Bearer <key>'",
    "404": "no such route, or (OpenAI face) no such model",
    "405": "the route does not take this method",
    "408": "the body did not arrive within --http_body_timeout",
    "413": "the body is over --max_body_size",
    "500": "a bug: the message says which room failed; the server keeps serving",
    "503": "not ready yet, shutting down, or over --max_connections",
}
GET_STATUSES = ("401", "404", "405", "500", "503")

NATIVE_ERROR = {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}
OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}}}}}


def operation(path: str, model: type[BaseModel] | None, media: str, error_ref: str) -> dict[str, Any]:
    ok: dict[str, Any] = {media: {"schema": {"type": "object"} if media == "application/json" else {"type": "string"}}}
    if path in STREAMING:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    error = {"application/json": {"schema": {"$ref": error_ref}}}
    statuses = ERROR_STATUSES if model is not None else {s: ERROR_STATUSES[s] for s in GET_STATUSES}
    responses = {"200": {"description": "the answer", "content": ok}}
    responses.update({status: {"description": why, "content": error} for status, why in statuses.items()})
    op: dict[str, Any] = {"operationId": path.strip("/").replace("/", "_") or "root", "responses": responses}
    if path == "/health":  # the readiness probe's 503 has the native body too
        op["responses"]["503"]["description"] = "a room does not answer"
    if model is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    return {"post" if model is not None else "get": op}


def openapi_document(title: str, version: str) -> dict[str, Any]:
    models = {m for routes in (NATIVE_ROUTES, OPENAI_ROUTES) for m, _ in routes.values() if m is not None}
    _, schemas = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                    ref_template="#/components/schemas/{model}")
    components = dict(schemas.get("$defs", {}))
    components["NativeError"] = NATIVE_ERROR
    components["OpenAIError"] = OPENAI_ERROR
    paths = {path: operation(path, model, media, "#/components/schemas/NativeError")
             for path, (model, media) in NATIVE_ROUTES.items()}
    paths.update({path: operation(path, model, media, "#/components/schemas/OpenAIError")
                  for path, (model, media) in OPENAI_ROUTES.items()})
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "responses": {
        "200": {"description": "this document", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": components}}
