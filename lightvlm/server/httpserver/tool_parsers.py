"""Tool calls in model output: a parser per output format, chosen by `--tool_call_parser` (vLLM's flag
and names).

Both formats lightvlm knows wrap one JSON object per call in tags: Qwen2 / Qwen2.5 / Hermes write
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, InternLM2 writes
`<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`. A parser parses a
whole text (non-streamed answers), follows a stream (`ToolStream`: content deltas, then each call's
name once and its arguments in pieces, as OpenAI streams them), and writes the grammar that forces a
call when `tool_choice` is `required` or names a function (the structured-output machinery).
"""

import json
import re
import uuid
from dataclasses import dataclass

from lightvlm.common.grammar import JSON_OPTIONS
from lightvlm.sampling_params import Constraint


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def to_json(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class TaggedJsonParser:
    """Calls written as `start` + JSON object + `end`. `start_lark` / `end_lark` are the same tags in
    llguidance's Lark (special tokens by name, text quoted); calls in a row are separated by `sep`."""

    start: str
    end: str
    start_lark: str
    end_lark: str
    arguments_key: str = "arguments"
    sep: str = "\n"
    needs_special_tokens: bool = False  # the tags are special tokens: keep them in the text

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content outside the calls, or None; the calls). A tagged block that is not a call stays content."""
        content, calls, pos = [], [], 0
        while (i := text.find(self.start, pos)) >= 0:
            content.append(text[pos:i])
            j = text.find(self.end, i + len(self.start))
            stop = j if j >= 0 else len(text)
            call = self.to_call(text[i + len(self.start):stop])
            if call is None:
                content.append(text[i:stop + len(self.end) if j >= 0 else stop])
            else:
                calls.append(call)
            pos = stop + len(self.end) if j >= 0 else stop
        content.append(text[pos:])
        return "".join(content).strip() or None, calls

    def to_call(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get(self.arguments_key, value.get("arguments", {}))
        return ToolCall(call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))

    def grammar(self, functions: list[dict], parallel: bool) -> Constraint:
        """A grammar that allows only calls of these functions ({"name", "parameters", "strict"}): one, or
        with `parallel` one or more."""
        from lightvlm.server.httpserver.structured import strict_schema

        options = []
        for function in functions:
            parameters = function.get("parameters") or {"type": "object"}
            if function.get("strict"):
                parameters = strict_schema(parameters)
            options.append({"type": "object", "properties": {"name": {"const": function["name"]},
                                                             self.arguments_key: parameters},
                            "required": ["name", self.arguments_key], "additionalProperties": False})
        schema = {"x-guidance": JSON_OPTIONS, "anyOf": options}
        repeat = f" ({json.dumps(self.sep)} call)*" if parallel else ""
        lark = f"start: call{repeat}\ncall: {self.start_lark} body {self.end_lark}\nbody: %json {json.dumps(schema)}\n"
        return Constraint("grammar", lark)


TOOL_PARSERS: dict[str, TaggedJsonParser] = {
    # Qwen2 / Qwen2.5 / Qwen3 and Hermes-2-Pro templates (vLLM's `hermes`)
    "hermes": TaggedJsonParser("<tool_call>", "</tool_call>", json.dumps("<tool_call>\n"),
                               json.dumps("\n</tool_call>")),
    # InternLM2 / InternLM2.5 chat (vLLM's `internlm`): the tags are special tokens
    "internlm": TaggedJsonParser("<|action_start|><|plugin|>", "<|action_end|>",
                                 '<|action_start|> <|plugin|> "\\n"', "<|action_end|>", arguments_key="parameters",
                                 needs_special_tokens=True),
}

HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')
CLOSING = re.compile(r"\}?\s*$")


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ToolStream:
    """Follows one choice's streamed text; `feed` returns the OpenAI delta dicts to send for it."""

    def __init__(self, parser: TaggedJsonParser):
        self.parser = parser
        self.buffer = ""  # text not yet turned into deltas
        self.in_call = False
        self.header_sent = False  # the current call's name went out; its arguments follow in pieces
        self.arguments_sent = 0  # characters of the current call's arguments already sent
        self.num_calls = 0

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        deltas = []
        while True:
            delta = self._call_step() if self.in_call else self._content_step()
            if delta is None:
                return deltas
            if delta:
                deltas.append(delta)

    def finish(self) -> list[dict]:
        """The choice ended: whatever is still held, as content or as the rest of an unfinished call."""
        deltas, rest, self.buffer = [], self.buffer, ""
        if not self.in_call:
            return [{"content": rest}] if rest else []
        if self.header_sent:
            arguments = rest[:CLOSING.search(rest).start()]
            if arguments[self.arguments_sent:]:
                deltas.append(self._arguments(arguments[self.arguments_sent:]))
        elif (call := self.parser.to_call(rest)) is not None:
            deltas.append(self._whole(call))
        else:  # a start tag and no call after it: that was text
            deltas.append({"content": self.parser.start + rest})
        self.in_call = False
        return deltas

    def _content_step(self) -> dict | None:
        start = self.parser.start
        i = self.buffer.find(start)
        if i >= 0:
            content, self.buffer = self.buffer[:i], self.buffer[i + len(start):]
            self.in_call, self.header_sent, self.arguments_sent = True, False, 0
            return {"content": content} if content.strip() else {}  # no whitespace-only content around calls
        keep = held_prefix(self.buffer, start)
        content, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return {"content": content} if content else None

    def _call_step(self) -> dict | None:
        end = self.parser.end.strip()
        j = self.buffer.find(end)
        if not self.header_sent:
            match = HEADER.match(self.buffer)
            if match is not None and (j < 0 or match.end() <= j):
                self.buffer = self.buffer[match.end():]
                self.header_sent = True
                name = json.loads(f'"{match.group(1)}"')
                return {"tool_calls": [{"index": self.num_calls, "id": call_id(), "type": "function",
                                        "function": {"name": name, "arguments": ""}}]}
            if j < 0:
                return None
            body, self.buffer = self.buffer[:j], self.buffer[j + len(end):]
            self.in_call = False
            call = self.parser.to_call(body)
            return self._whole(call) if call is not None else {"content": self.parser.start + body + end}
        if j >= 0:
            body, self.buffer = self.buffer[:j], self.buffer[j + len(end):]
            arguments = body[:CLOSING.search(body).start()]
            self.in_call = False
            self.num_calls += 1
            rest = arguments[self.arguments_sent:]
            return self._arguments(rest, index=self.num_calls - 1) if rest else {}
        shown = self.buffer[:len(self.buffer) - held_prefix(self.buffer, end)]
        safe = shown[:CLOSING.search(shown).start()]
        if len(safe) <= self.arguments_sent:
            return None
        piece, self.arguments_sent = safe[self.arguments_sent:], len(safe)
        return self._arguments(piece)

    def _arguments(self, piece: str, index: int | None = None) -> dict:
        return {"tool_calls": [{"index": self.num_calls if index is None else index, "function": {"arguments": piece}}]}

    def _whole(self, call: ToolCall) -> dict:
        self.num_calls += 1
        return {"tool_calls": [{"index": self.num_calls - 1, **call.to_json()}]}
