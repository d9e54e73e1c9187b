"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions, and vLLM's /tokenize,
/detokenize and /version.

Images and videos in chat messages (`image_url` and `video_url` parts with http(s) or data: URLs; a
video's `fps` or `num_frames` choose its frames) are placed where they appear, through the
checkpoint's own chat template, which also renders `tools`. Requests are validated as vLLM validates
them (openai_protocol.py); errors are in OpenAI's format. `usage.prompt_tokens` counts the ids the
model saw, image and video tokens included. Without max_tokens, generation may run to the context
limit.
"""

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel

import lightvlm
from lightvlm.models.processor import PromptError, split_media
from lightvlm.server.httpserver.http_utils import parse, read_json
from lightvlm.server.httpserver.manager import ClientError, HttpServerManager, Prepared, gather_or_cancel
from lightvlm.server.httpserver.openai_completion import Completion, Shape, now, usage
from lightvlm.server.httpserver.openai_protocol import (
    LENIENT,
    ChatRequest,
    CompletionRequest,
    ModelNotFound,
    ProcessorKwargs,
    check_messages,
)
from lightvlm.server.httpserver.tool_parsers import TOOL_PARSERS


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages (images counted as the model sees them)."""

    model_config = LENIENT
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = LENIENT
    model: str | None = None
    tokens: list[int]


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI sends a tool call's arguments as JSON text; chat templates expect the object (as vLLM does)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            message = {**message, "tool_calls": [with_parsed_arguments(c) for c in calls]}
        out.append(message)
    return out


def with_parsed_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except (json.JSONDecodeError, RecursionError):
            raise ClientError(f"tool call arguments must be JSON text, got {function['arguments']!r:.80}") from None
    return call


class OpenAIAPI:
    def __init__(self, manager: HttpServerManager):
        self.manager = manager
        self.model_name = manager.config.model.model_name
        self.tokenizer = manager.processor.tokenizer
        name = manager.config.http.tool_call_parser
        self.tool_parser = TOOL_PARSERS[name] if name else None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/version", self.version)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": now(), "owned_by": "lightvlm",
                "max_model_len": self.manager.max_len}
        return web.json_response({"object": "list", "data": [card]})

    async def load_chat(self, messages: list[dict], kwargs: "ProcessorKwargs | None" = None, **template) -> Prepared:
        try:
            templated, sources, video_sources = split_media(template_messages(messages))
        except PromptError as e:
            raise ClientError(str(e)) from None
        if any(not isinstance(s, str) for s in sources):
            raise ClientError("each image_url part needs a 'url' string (http(s) or a data: URL)")
        if any(not isinstance(v.source, str) for v in video_sources):
            raise ClientError("each video part needs a 'url' string (http(s) or a data: URL)")
        kwargs = kwargs or ProcessorKwargs()
        bounds = self.manager.pixel_bounds(kwargs.min_pixels, kwargs.max_pixels)
        images, videos = await gather_or_cancel([self.manager.load_images([("url", s) for s in sources]),
                                                 self.manager.load_videos([("url", v.source, v.sampling)
                                                                           for v in video_sources])])
        return await self.manager.prepare_chat(templated, images, [bounds] * len(images), videos, **template)

    # -- chat ----------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req: ChatRequest = parse(ChatRequest, await read_json(request))
        req.check(self.model_name)
        if req.top_logprobs is not None and not req.logprobs:
            raise ClientError("top_logprobs needs logprobs: true")
        parser = None
        if req.tools:
            if self.tool_parser is None:
                raise ClientError("this request has 'tools', but the server was started without "
                                  "--tool_call_parser (hermes for Qwen2/2.5/3 and Hermes, internlm for InternLM2)")
            parser = self.tool_parser if req.tool_choice != "none" else None
        forced = req.forced_functions()
        tool_constraint = None
        if forced and parser is not None:
            tool_constraint = parser.grammar([f.model_dump(exclude_none=True) for f in forced],
                                             parallel=req.parallel_tool_calls and req.tool_choice == "required")
        tools = [tool.model_dump(exclude_none=True) for tool in req.tools] if req.tools else None
        template_kwargs = dict(req.chat_template_kwargs or {})
        if req.documents is not None:
            template_kwargs["documents"] = req.documents
        prepared = await self.load_chat(req.messages, req.mm_processor_kwargs,
                                        add_generation_prompt=req.add_generation_prompt, tools=tools,
                                        template_kwargs=template_kwargs)
        params = req.sampling_params(
            req.logprobs, req.top_logprobs or 0, self.manager.sampling_defaults,
            constraint=req.constraint({"tool_choice": tool_constraint}),
            skip_special_tokens=False if parser is not None and parser.needs_special_tokens else None)
        params = await self.manager.check_params(self.manager.stop_tokens_by_name(params))
        params = self.manager.check_length(prepared, params, max_new_explicit=req.max_new_tokens() is not None)
        shape = Shape("chat", tools=parser, prompt_logprobs=req.prompt_logprobs is not None)
        run = Completion(self.manager, self.model_name, request, prepared, params, req.n, shape)
        if req.stream:
            return await run.stream(include_usage=bool(req.stream_options and req.stream_options.include_usage))
        return await run.respond()

    # -- completions ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        req.check(self.model_name)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or any(not p for p in prompts):
            raise ClientError("prompt must not be empty")
        if len(prompts) > 1 and req.stream:
            raise ClientError("streaming takes a single prompt")
        drop_output = req.max_tokens == 0  # scoring the prompt (echo): one token is generated, none shown
        if drop_output:
            req = req.model_copy(update={"max_tokens": 1, "max_completion_tokens": None})
        echo_logprobs = req.echo and req.logprobs is not None
        prompt_logprobs = req.logprobs if echo_logprobs else None
        if req.prompt_logprobs is not None:
            prompt_logprobs = max(req.prompt_logprobs, prompt_logprobs or 0)
        params = req.sampling_params(req.logprobs is not None, req.logprobs or 0, self.manager.sampling_defaults,
                                     constraint=req.constraint(), prompt_logprobs=prompt_logprobs)
        params = await self.manager.check_params(self.manager.stop_tokens_by_name(params))
        runs = []
        for prompt in prompts:
            if isinstance(prompt, str):
                prepared = await self.manager.prepare_text(prompt, [])
            else:
                prepared = self.manager.prepare_ids(prompt)
            checked = self.manager.check_length(prepared, params, max_new_explicit=req.max_new_tokens() is not None)
            echo = (prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)) if req.echo else ""
            shape = Shape("text", echo=echo, echo_logprobs=echo_logprobs, drop_output=drop_output,
                          prompt_logprobs=req.prompt_logprobs is not None)
            runs.append(Completion(self.manager, self.model_name, request, prepared, checked, req.n, shape))
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

    # -- vLLM's small endpoints ----------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ModelNotFound(f"The model `{model}` does not exist.")

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = parse(TokenizeRequest, await read_json(request))
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ClientError("give either 'prompt' or 'messages'")
        if req.messages is not None:
            check_messages(req.messages)
            prepared = await self.load_chat(req.messages, add_generation_prompt=req.add_generation_prompt,
                                            tools=req.tools, template_kwargs=req.chat_template_kwargs)
        else:
            prepared = await self.manager.prepare_text(req.prompt, [], req.add_special_tokens)
        ids = prepared.prompt_ids
        strs = [self.tokenizer.convert_ids_to_tokens(i) for i in ids] if req.return_token_strs else None
        return web.json_response({"count": len(ids), "max_model_len": self.manager.max_len, "tokens": ids,
                                  "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = parse(DetokenizeRequest, await read_json(request))
        self.check_model(req.model)
        prepared = self.manager.prepare_ids(req.tokens) if req.tokens else Prepared([])
        return web.json_response({"prompt": self.tokenizer.decode(prepared.prompt_ids)})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": lightvlm.__version__})
