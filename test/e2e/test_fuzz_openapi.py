"""Fuzzing both faces from their own /openapi.json: bodies drawn from the request schemas (mostly valid,
often with any JSON in a field's place) get a documented status with a JSON body, never a 5xx, and
/health stays 200. Bounded: EXAMPLES bodies per route, a few tokens each (about a minute in all)."""

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAULTY_TOKEN
from schema_strategies import SchemaStrategies

EXAMPLES = 60
LOOPBACK_URL = "http://127.0.0.1:9/fuzz.png"  # the discard port: refused, and on loopback (tests send nowhere else)


@pytest.fixture(scope="module")
def document(main_server):
    response = main_server.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    return doc


def test_the_document_describes_both_faces(document):
    paths = document["paths"]
    for path in ("/generate", "/generate_stream", "/tokens", "/v1/chat/completions", "/v1/completions"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].rsplit("/", 1)[1] in document["components"]["schemas"]
        assert {"200", "400", "413", "503"} <= set(paths[path]["post"]["responses"])
    assert "max_new_tokens" in document["components"]["schemas"]["NativeParameters"]["properties"]
    assert "messages" in document["components"]["schemas"]["ChatRequest"]["properties"]


def loopback_only(value):
    """A drawn body with every URL pointed at loopback, and no prompt starting with the main server's
    fault-injection token (a 500 by design, see conftest)."""
    if isinstance(value, str):
        return LOOPBACK_URL if "://" in value else value
    if isinstance(value, list):
        value = [loopback_only(v) for v in value]
        if value and value[0] == FAULTY_TOKEN and type(value[0]) is int:
            value[0] = FAULTY_TOKEN + 1
        return value
    if isinstance(value, dict):
        return {k: loopback_only(v) for k, v in value.items()}
    return value


def check_answer(response: requests.Response, documented: set[str], path: str) -> None:
    assert str(response.status_code) in documented, (path, response.status_code, response.text[:300])
    assert response.status_code < 500, (path, response.status_code, response.text[:300])
    kind = response.headers.get("Content-Type", "")
    if kind.startswith("text/event-stream"):
        assert response.status_code == 200
        for line in response.text.splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                event = json.loads(line[5:])
                assert "error" not in event, (path, event)
    elif not kind.startswith("text/plain"):  # /metrics is the one text route
        assert kind.startswith("application/json"), (path, kind)
        response.json()


POSTS = ["/generate", "/generate_stream", "/tokens", "/v1/chat/completions", "/v1/completions", "/tokenize",
         "/detokenize"]


@pytest.mark.parametrize("path", POSTS)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_bodies_get_a_documented_answer(main_server, document, path, data):
    operation = document["paths"][path]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    body = loopback_only(data.draw(SchemaStrategies(document["components"]["schemas"]).body(schema)))
    response = main_server.post(path, json=body, timeout=60)
    check_answer(response, set(operation["responses"]), path)


def test_every_get_route_gets_a_documented_answer(main_server, document):
    for path, item in document["paths"].items():
        if "get" in item:
            response = main_server.get(path, timeout=30)
            check_answer(response, set(item["get"]["responses"]), path)


def test_health_stays_ok_after_fuzzing(main_server):
    assert main_server.get("/health").status_code == 200
