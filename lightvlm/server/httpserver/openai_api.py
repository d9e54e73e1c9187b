"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions.

Images and videos in chat messages (`image_url` and `video_url` parts with http(s) or data: URLs; a
video's `fps` or `num_frames` choose its frames) are placed where they appear, through the
checkpoint's own chat template. Unknown fields are ignored (clients send extras);
known fields with wrong values are a 400 in OpenAI's error format. `usage.prompt_tokens` counts
the ids the model saw, image tokens included. Without max_tokens, generation may run to the context
limit.
"""

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lightvlm.io_struct import TextOut, TokenLogprob
from lightvlm.models.processor import PromptError, split_media
from lightvlm.sampling_params import MAX_CHOICES, MAX_INT32, SamplingParams
from lightvlm.server.httpserver.http_utils import parse, read_json
from lightvlm.server.httpserver.manager import ClientError, HttpServerManager, Prepared, gather_or_cancel

LENIENT = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = LENIENT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both completion endpoints accept besides the prompt."""

    model_config = LENIENT
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None  # None: the checkpoint's generation_config.json, else 1
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    skip_special_tokens: bool = True

    @field_validator("n")
    @classmethod
    def check_n(cls, n: int) -> int:
        if not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be between 1 and {MAX_CHOICES}")
        return n

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, logprobs: bool, top_logprobs: int, defaults: dict) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        explicit = self.max_new_tokens()
        temperature = defaults["temperature"] if self.temperature is None else self.temperature
        params = SamplingParams.build(  # without max_tokens, check_length gives the rest of the context
            defaults, max_new_tokens=explicit if explicit is not None else MAX_INT32, min_new_tokens=self.min_tokens,
            do_sample=temperature > 0, temperature=temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, ignore_eos=self.ignore_eos,
            stop_sequences=stop, stop_token_ids=list(self.stop_token_ids),
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs, top_logprobs=top_logprobs)
        try:
            return params.validate()
        except ValueError as e:
            message = str(e).replace("max_new_tokens", "max_tokens").replace("min_new_tokens", "min_tokens")
            raise ClientError(message) from None


class ProcessorKwargs(BaseModel):
    """`mm_processor_kwargs` (as vLLM names them): the resolution bounds of this request's images."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt bound must not pass unnoticed
    min_pixels: int | None = None
    max_pixels: int | None = None


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]]
    logprobs: bool = False
    top_logprobs: int | None = None
    mm_processor_kwargs: ProcessorKwargs | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


def now() -> int:
    return int(time.time())


class OpenAIAPI:
    def __init__(self, manager: HttpServerManager):
        self.manager = manager
        self.model_name = manager.config.model.model_name
        self.tokenizer = manager.processor.tokenizer

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": now(), "owned_by": "lightvlm",
                "max_model_len": self.manager.max_len}
        return web.json_response({"object": "list", "data": [card]})

    # -- chat ----------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        try:
            messages, sources, video_sources = split_media(req.messages)
        except PromptError as e:
            raise ClientError(str(e)) from None
        if any(not isinstance(s, str) for s in sources):
            raise ClientError("each image_url part needs a 'url' string (http(s) or a data: URL)")
        if any(not isinstance(v.source, str) for v in video_sources):
            raise ClientError("each video part needs a 'url' string (http(s) or a data: URL)")
        kwargs = req.mm_processor_kwargs or ProcessorKwargs()
        bounds = self.manager.pixel_bounds(kwargs.min_pixels, kwargs.max_pixels)
        images, videos = await gather_or_cancel([self.manager.load_images([("url", s) for s in sources]),
                                                 self.manager.load_videos([("url", v.source, v.sampling)
                                                                           for v in video_sources])])
        prepared = await self.manager.prepare_chat(messages, images, [bounds] * len(images), videos)
        if req.top_logprobs is not None and not req.logprobs:
            raise ClientError("top_logprobs needs logprobs: true")
        params = self.manager.stop_tokens_by_name(
            req.sampling_params(req.logprobs, req.top_logprobs or 0, self.manager.sampling_defaults))
        params = self.manager.check_length(prepared, params, max_new_explicit=req.max_new_tokens() is not None)
        run = Completion(self, request, prepared, params, req.n, kind="chat")
        if req.stream:
            return await run.stream(include_usage=bool(req.stream_options and req.stream_options.include_usage))
        return await run.respond()

    # -- completions ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or any(not p for p in prompts):
            raise ClientError("prompt must not be empty")
        if len(prompts) > 1 and req.stream:
            raise ClientError("streaming takes a single prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise ClientError("logprobs must be between 0 and 20")
        params = self.manager.stop_tokens_by_name(
            req.sampling_params(req.logprobs is not None, req.logprobs or 0, self.manager.sampling_defaults))
        runs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                prepared = await self.manager.prepare_text(prompt, [])
            else:
                prepared = self.manager.prepare_ids(prompt)
            checked = self.manager.check_length(prepared, params,
                                                max_new_explicit=req.max_new_tokens() is not None)
            echo = (prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)) if req.echo else ""
            runs.append(Completion(self, request, prepared, checked, req.n, kind="text", echo=echo))
        if req.stream:
            return await runs[0].stream(include_usage=bool(req.stream_options and req.stream_options.include_usage))
        bodies = await gather_or_cancel(run.collect() for run in runs)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (body, run) in enumerate(zip(bodies, runs)):
            for choice in body["choices"]:
                choice["index"] = i * run.n + choice["index"]
                choices.append(choice)
            prompt_tokens += body["usage"]["prompt_tokens"]
            completion_tokens += body["usage"]["completion_tokens"]
        body = bodies[0]
        body["choices"] = choices
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return web.json_response(body)

    # -- logprobs ------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprob(self, out: TextOut) -> dict:
        lp: TokenLogprob = out.logprob
        text = self.token_text(lp.token_id)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.token_text(i)), "logprob": v, "bytes": list(t.encode())}
                                 for i, v in lp.top]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Completion:
    """One prompt, `n` choices, answered whole or streamed."""

    def __init__(self, api: OpenAIAPI, request: web.Request, prepared: Prepared, params: SamplingParams, n: int,
                 kind: str, echo: str = ""):
        self.api, self.request, self.prepared, self.params, self.n = api, request, prepared, params, n
        self.kind, self.echo = kind, echo
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = now()
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    async def submit_all(self):
        return await self.api.manager.submit_many(self.prepared, [self.params.for_choice(i) for i in range(self.n)])

    async def collect(self) -> dict:
        results = await self.api.manager.collect_all(await self.submit_all(), self._collect_one)
        choices = []
        for index, (outs, text) in enumerate(results):
            reason = outs[-1].finish_reason if outs else "stop"
            if self.kind == "chat":
                logprobs = {"content": [self.api.chat_logprob(o) for o in outs if o.logprob]} \
                    if self.params.logprobs else None
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": index, "text": self.echo + text, "finish_reason": reason,
                                "logprobs": self.text_logprobs(outs) if self.params.logprobs else None})
        completion_tokens = sum(len(outs) for outs, _ in results)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.api.model_name,
                "choices": choices, "usage": usage(len(self.prepared.prompt_ids), completion_tokens)}

    async def _collect_one(self, state) -> tuple[list[TextOut], str]:
        outs = []
        async with aclosing(self.api.manager.stream(state)) as stream:
            async for out in stream:
                outs.append(out)
        return outs, "".join(o.text for o in outs)

    def text_logprobs(self, outs: list[TextOut]) -> dict:
        tokens, values, tops, offsets, offset = [], [], [], [], len(self.echo)
        for out in outs:
            if out.logprob is None:
                continue
            tokens.append(self.api.token_text(out.logprob.token_id))
            values.append(out.logprob.logprob)
            tops.append({self.api.token_text(i): v for i, v in out.logprob.top} or None)
            offsets.append(offset)
            offset += len(out.text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def respond(self) -> web.Response:
        return web.json_response(await self.collect())

    # -- streaming -----------------------------------------------------------------------------

    def chunk(self, index: int, delta: dict | None = None, reason: str | None = None, logprobs=None,
              text: str | None = None) -> dict:
        if self.kind == "chat":
            choice = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.api.model_name,
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
            for index in range(self.n):
                opening = {"role": "assistant", "content": ""} if self.kind == "chat" else None
                if opening or self.echo:
                    await self.send(response, self.chunk(index, opening, text=self.echo))
            completion_tokens, done, item = 0, 0, first
            while True:
                if isinstance(item, Exception):
                    await self.send(response, {"error": {"message": str(item), "type": "server_error",
                                                         "code": getattr(item, "status", 500)}})
                    break
                index, out = item
                completion_tokens += 1
                await self.send(response, self.delta_chunk(index, out))
                done += out.finish_reason is not None
                if done == self.n:
                    break
                item = await queue.get()
            if include_usage:
                body = {"id": self.id, "object": self.chunk_object, "created": self.created,
                        "model": self.api.model_name, "choices": [],
                        "usage": usage(len(self.prepared.prompt_ids), completion_tokens)}
                await self.send(response, body)
            await response.write(b"data: [DONE]\n\n")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for state in states:
                await self.api.manager.abort(state)
        await response.write_eof()
        return response

    def delta_chunk(self, index: int, out: TextOut) -> dict:
        if self.kind == "chat":
            logprobs = {"content": [self.api.chat_logprob(out)]} if self.params.logprobs and out.logprob else None
            return self.chunk(index, {"content": out.text} if out.text else {}, out.finish_reason, logprobs)
        logprobs = None
        if self.params.logprobs and out.logprob:
            logprobs = self.text_logprobs([out])
        return self.chunk(index, reason=out.finish_reason, logprobs=logprobs, text=out.text)

    async def _pump(self, index: int, state, queue: asyncio.Queue) -> None:
        try:
            async with aclosing(self.api.manager.stream(state)) as stream:
                async for out in stream:
                    queue.put_nowait((index, out))
        except Exception as e:  # noqa: BLE001 (handed to the writer, which reports it)
            queue.put_nowait(e)

    @staticmethod
    async def send(response: web.StreamResponse, body: dict) -> None:
        await response.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")
