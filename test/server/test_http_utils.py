"""Reading request bodies: nesting bounded before json.loads, unpaired surrogates refused with where they
are, invalid JSON a 400; chat messages checked; aiohttp's own errors answered as the protocol's JSON."""

import asyncio
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from lightvlm.server.httpserver.app import errors_as_json
from lightvlm.server.httpserver.http_utils import MAX_JSON_DEPTH, json_depth, loads
from lightvlm.server.httpserver.manager import ClientError
from lightvlm.server.httpserver.openai_protocol import ChatRequest, check_messages


def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth(b'{"a": [1, {"b": 2}]}') == 3
    assert json_depth(b'"[[[[{{{{"') == 0
    assert json_depth(b'["\\"[[[", ["\\\\"], [[]]]') == 3  # an escaped quote does not end the string
    assert json_depth(b"") == 0


def test_json_depth_stops_past_the_limit():
    assert json_depth(b"[" * 100_000) == MAX_JSON_DEPTH + 1


def test_deep_nesting_is_a_400_naming_the_bound():
    with pytest.raises(ClientError, match=f"deeper than the limit of {MAX_JSON_DEPTH} levels"):
        loads(b"[" * 100_000)
    with pytest.raises(ClientError, match=str(MAX_JSON_DEPTH)):
        loads(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert loads(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None


def test_invalid_json_is_a_400():
    with pytest.raises(ClientError, match="not valid JSON"):
        loads(b'{"inputs": "hi", "parameters": {')
    with pytest.raises(ClientError, match="not valid JSON"):
        loads(b"\xff\xfe")


def test_a_lone_surrogate_is_refused_with_its_field_and_position():
    with pytest.raises(ClientError, match=r"^inputs contains an unpaired surrogate \(U\+D800\) at character 1"):
        loads(b'{"inputs": "a\\ud800b"}')
    with pytest.raises(ClientError, match=r"^messages\[0\]\.content\[1\]\.text contains an unpaired surrogate "
                                          r"\(U\+DC00\) at character 0"):
        loads(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, '
              b'{"type": "text", "text": "\\udc00"}]}]}')
    with pytest.raises(ClientError, match=r"^prompt\[1\] contains an unpaired surrogate"):
        loads(b'{"prompt": ["fine", "x\\udfff"]}')
    with pytest.raises(ClientError, match="unpaired surrogate"):
        loads(b'{"\\ud800": 1}')


def test_a_surrogate_pair_is_text():
    assert loads(b'{"inputs": "\\ud83d\\ude00"}') == {"inputs": "\U0001F600"}


def test_empty_messages_are_refused():
    with pytest.raises(ClientError, match="^messages must not be empty$"):
        check_messages([])
    req = ChatRequest.model_validate({"messages": []})
    with pytest.raises(ClientError, match="messages must not be empty"):
        req.check("m")


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": 5}]}],
     r"messages\[0\]\.content\[1\]\.text must be a string, got int"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 5}],
     r"messages\[1\]\.content must be a string or a list of parts, got int"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\]\.content\[0\]\.text must be a string"),
    ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\.content\[0\] must be an object"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"role": 1, "content": "hi"}], r"messages\[0\]\.role must be a string"),
])
def test_non_string_text_is_refused_naming_the_path(messages, expected):
    with pytest.raises(ClientError, match=expected):
        check_messages(messages)


def test_good_messages_pass():
    check_messages([{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
                    {"role": "assistant", "content": None, "tool_calls": []}])


def call(path: str, method: str = "GET", data: bytes | None = None, max_size: int = 1024):
    async def go():
        app = web.Application(client_max_size=max_size, middlewares=[errors_as_json])

        async def echo(request):
            return web.json_response(loads(await request.read()))

        app.router.add_post("/generate", echo)
        app.router.add_post("/v1/chat/completions", echo)
        async with TestClient(TestServer(app)) as client:
            response = await client.request(method, path, data=data)
            return response.status, response.content_type, await response.text()

    return asyncio.run(go())


def test_unknown_path_is_json_on_each_face():
    status, kind, text = call("/nope")
    assert (status, kind) == (404, "application/json")
    assert json.loads(text) == {"message": "no route for GET /nope"}
    status, kind, text = call("/v1/nope")
    assert (status, kind) == (404, "application/json")
    assert json.loads(text)["error"] == {"message": "no route for GET /v1/nope", "type": "not_found_error",
                                         "code": 404}


def test_wrong_method_is_json():
    status, kind, text = call("/generate")
    assert (status, kind) == (405, "application/json")
    assert "use POST" in json.loads(text)["message"]


def test_body_too_large_is_json_naming_the_bound():
    status, kind, text = call("/v1/chat/completions", "POST", b"[" + b"1," * 2000 + b"1]")
    assert (status, kind) == (413, "application/json")
    assert "1024 bytes" in json.loads(text)["error"]["message"]


def test_deep_body_is_a_json_400():
    status, _, text = call("/generate", "POST", b"[" * 1000)
    assert status == 400
    assert f"limit of {MAX_JSON_DEPTH}" in json.loads(text)["message"]


def test_brackets_inside_strings_do_not_count():
    text = "[{" * 1000
    assert loads(json.dumps({"inputs": text, "q": "\\\"[["}).encode()) == {"inputs": text, "q": "\\\"[["}
