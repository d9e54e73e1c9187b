"""One OpenAI completion: a prompt, `n` choices, answered whole or streamed, in the chat or the text
(legacy completions) shape. Tool calls are parsed out of chat choices when the request has tools;
prompt logprobs come with each choice's first token (`echo` + `logprobs`, or vLLM's `prompt_logprobs`).
"""

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from aiohttp import web

from lightvlm.io_struct import TextOut, TokenLogprob
from lightvlm.sampling_params import SamplingParams
from lightvlm.server.httpserver.manager import HttpServerManager, Prepared
from lightvlm.server.httpserver.tool_parsers import TaggedJsonParser, ToolStream


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass(frozen=True)
class Shape:
    """How the choices are written: which endpoint, and what comes with the generated text."""

    kind: str  # "chat" | "text"
    echo: str = ""  # text: the prompt, written before each choice's text
    echo_logprobs: bool = False  # text: `logprobs` cover the echoed prompt's tokens too
    drop_output: bool = False  # text: max_tokens 0 with echo (the one token generated is not shown)
    tools: TaggedJsonParser | None = None  # chat: parse tool calls out of the text
    prompt_logprobs: bool = False  # vLLM's prompt_logprobs field in the answer


class Completion:
    def __init__(self, manager: HttpServerManager, model_name: str, request: web.Request, prepared: Prepared,
                 params: SamplingParams, n: int, shape: Shape):
        self.manager, self.model_name, self.request = manager, model_name, request
        self.prepared, self.params, self.n, self.shape = prepared, params, n, shape
        self.tokenizer = manager.processor.tokenizer
        self.id = ("chatcmpl-" if shape.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = now()
        self.object = "chat.completion" if shape.kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if shape.kind == "chat" else "text_completion"

    async def submit_all(self):
        return await self.manager.submit_many(self.prepared, [self.params.for_choice(i) for i in range(self.n)])

    # -- logprobs ------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprob(self, lp: TokenLogprob) -> dict:
        text = self.token_text(lp.token_id)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.token_text(i)), "logprob": v, "bytes": list(t.encode())}
                                 for i, v in lp.top]}

    def text_logprobs(self, outs: list[TextOut], prompt: tuple | None) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        if self.shape.echo_logprobs:  # the prompt's tokens first; the first one has no logprob
            offset = 0
            for i, token_id in enumerate(self.prepared.prompt_ids):
                lp = prompt[i] if prompt else None
                text = self.token_text(token_id)
                tokens.append(text)
                values.append(lp.logprob if lp else None)
                tops.append({self.token_text(t): v for t, v in lp.top} if lp and lp.top else None)
                offsets.append(offset)
                offset += len(text)
        offset = len(self.shape.echo)
        for out in outs:
            if out.logprob is None:
                continue
            tokens.append(self.token_text(out.logprob.token_id))
            values.append(out.logprob.logprob)
            tops.append({self.token_text(i): v for i, v in out.logprob.top} or None)
            offsets.append(offset)
            offset += len(out.text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def vllm_prompt_logprobs(self, prompt: tuple | None) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: {logprob, decoded_token}}."""
        if not prompt:
            return None
        out = []
        for lp in prompt:
            if lp is None:
                out.append(None)
                continue
            entries = {str(lp.token_id): {"logprob": lp.logprob, "decoded_token": self.token_text(lp.token_id)}}
            for token_id, value in lp.top:
                entries.setdefault(str(token_id), {"logprob": value, "decoded_token": self.token_text(token_id)})
            out.append(entries)
        return out

    # -- whole answers -------------------------------------------------------------------------

    async def collect(self) -> dict:
        states = await self.submit_all()
        results = await self.manager.collect_all(states, self._collect_one)
        choices, completion_tokens, first_prompt = [], 0, None
        for index, (outs, text) in enumerate(results):
            reason = outs[-1].finish_reason if outs else "stop"
            prompt = outs[0].prompt_logprobs if outs else None
            first_prompt = first_prompt or prompt
            if self.shape.drop_output:
                outs, text, reason = [], "", "length"
            completion_tokens += len(outs)
            choices.append(self.chat_choice(index, outs, text, reason) if self.shape.kind == "chat"
                           else self.text_choice(index, outs, text, reason, prompt))
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model_name,
                "choices": choices,
                "usage": usage(len(self.prepared.prompt_ids), completion_tokens, states[0].num_cached_tokens)}
        if self.shape.prompt_logprobs and self.shape.kind == "chat":
            body["prompt_logprobs"] = self.vllm_prompt_logprobs(first_prompt)
        return body

    def chat_choice(self, index: int, outs: list[TextOut], text: str, reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        if self.shape.tools is not None:
            content, calls = self.shape.tools.parse(text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [c.to_json() for c in calls]}
                reason = "tool_calls" if reason == "stop" else reason
        logprobs = {"content": [self.chat_logprob(o.logprob) for o in outs if o.logprob]} \
            if self.params.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def text_choice(self, index: int, outs: list[TextOut], text: str, reason: str, prompt) -> dict:
        choice = {"index": index, "text": self.shape.echo + text, "finish_reason": reason,
                  "logprobs": self.text_logprobs(outs, prompt) if self.params.logprobs else None}
        if self.shape.prompt_logprobs:
            choice["prompt_logprobs"] = self.vllm_prompt_logprobs(prompt)
        return choice

    async def _collect_one(self, state) -> tuple[list[TextOut], str]:
        outs = []
        async with aclosing(self.manager.stream(state)) as stream:
            async for out in stream:
                outs.append(out)
        return outs, "".join(o.text for o in outs)

    async def respond(self) -> web.Response:
        return web.json_response(await self.collect())

    # -- streaming -----------------------------------------------------------------------------

    def chunk(self, index: int, delta: dict | None = None, reason: str | None = None, logprobs=None,
              text: str | None = None) -> dict:
        if self.shape.kind == "chat":
            choice = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_name,
                "choices": [choice]}

    async def stream(self, include_usage: bool) -> web.StreamResponse:
        states = await self.submit_all()
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, s, queue)) for i, s in enumerate(states)]
        response = None
        try:
            first = await queue.get()  # errors before any token get a proper status
            if isinstance(first, Exception):
                raise first
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(self.request)
            if self.shape.kind == "chat":
                for index in range(self.n):
                    await self.send(response, self.chunk(index, {"role": "assistant", "content": ""}))
            tool_streams = {i: ToolStream(self.shape.tools) for i in range(self.n)} if self.shape.tools else {}
            started: set[int] = set()
            completion_tokens, done, item = 0, 0, first
            while True:
                if isinstance(item, Exception):
                    await self.send(response, {"error": {"message": str(item), "type": "server_error",
                                                         "code": getattr(item, "status", 500)}})
                    break
                index, out = item
                if index not in started:
                    started.add(index)
                    for body in self.opening_chunks(index, out):
                        await self.send(response, body)
                completion_tokens += not self.shape.drop_output
                for body in self.delta_chunks(index, out, tool_streams.get(index)):
                    await self.send(response, body)
                done += out.finish_reason is not None
                if done == self.n:
                    break
                item = await queue.get()
            if include_usage:
                body = {"id": self.id, "object": self.chunk_object, "created": self.created,
                        "model": self.model_name, "choices": [],
                        "usage": usage(len(self.prepared.prompt_ids), completion_tokens,
                                       states[0].num_cached_tokens)}
                await self.send(response, body)
            await response.write(b"data: [DONE]\n\n")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for state in states:
                await self.manager.abort(state)
        await response.write_eof()
        return response

    def opening_chunks(self, index: int, out: TextOut) -> list[dict]:
        """Before a text choice's first token: the echoed prompt, with its logprobs when asked."""
        if self.shape.kind == "chat" or not self.shape.echo:
            return []
        logprobs = self.text_logprobs([], out.prompt_logprobs) if self.shape.echo_logprobs else None
        body = self.chunk(index, text=self.shape.echo, logprobs=logprobs)
        if self.shape.prompt_logprobs:
            body["choices"][0]["prompt_logprobs"] = self.vllm_prompt_logprobs(out.prompt_logprobs)
        return [body]

    def delta_chunks(self, index: int, out: TextOut, tools: ToolStream | None) -> list[dict]:
        reason = out.finish_reason
        if self.shape.drop_output:
            return [self.chunk(index, reason="length")] if reason else []
        if self.shape.kind == "text":
            logprobs = self.text_logprobs([out], None) if self.params.logprobs and out.logprob else None
            return [self.chunk(index, reason=reason, logprobs=logprobs, text=out.text)]
        logprobs = {"content": [self.chat_logprob(out.logprob)]} if self.params.logprobs and out.logprob else None
        if tools is None:
            return [self.chunk(index, {"content": out.text} if out.text else {}, reason, logprobs)]
        deltas = tools.feed(out.text) + (tools.finish() if reason else [])
        if reason == "stop" and tools.num_calls:
            reason = "tool_calls"
        if reason or (logprobs and not deltas):
            deltas.append({})  # the finish reason (or only the token's logprobs) in a chunk of its own
        if not deltas:
            return []  # text held back: it may be the start of a tag
        chunks = [self.chunk(index, delta) for delta in deltas]
        chunks[0]["choices"][0]["logprobs"] = logprobs
        chunks[-1]["choices"][0]["finish_reason"] = reason
        return chunks

    async def _pump(self, index: int, state, queue: asyncio.Queue) -> None:
        try:
            async with aclosing(self.manager.stream(state)) as stream:
                async for out in stream:
                    queue.put_nowait((index, out))
        except Exception as e:  # noqa: BLE001 (handed to the writer, which reports it)
            queue.put_nowait(e)

    @staticmethod
    async def send(response: web.StreamResponse, body: dict) -> None:
        await response.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
