"""LightLLM's native API: /generate, /generate_stream, /tokens and the small status endpoints.

The request schema accepts every parameter name LightLLM accepts (see docs/protocol.md for the ones
lightvlm does not act on yet) and rejects any other key, so a typo is a 400, not a silent default.
LightLLM's structured-output parameters (`guided_json`, `regular_constraint`, `guided_grammar`,
`allowed_token_ids`) constrain decoding; `return_details` adds the tokens' and the prompt's logprobs.
"""

import json
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from lightvlm.models.video import VideoRequestError, VideoSampling
from lightvlm.sampling_params import MAX_CHOICES, Constraint, SamplingParams
from lightvlm.server.httpserver.http_utils import parse, read_json
from lightvlm.server.httpserver.manager import (
    ClientError,
    HttpServerManager,
    RequestFailed,
    RequestState,
    gather_or_cancel,
)
from lightvlm.server.httpserver.structured import pick_one, schema_text

STRICT = ConfigDict(extra="forbid", strict=True)


class NativeImage(BaseModel):
    model_config = STRICT
    type: Literal["url", "base64"]
    data: str
    min_pixels: int | None = None  # this image's resolution bounds (dynamic-resolution models; only lower)
    max_pixels: int | None = None


class NativeVideo(BaseModel):
    model_config = STRICT
    type: Literal["url", "base64"]
    data: str
    fps: float | None = None  # frames per second to sample, or
    num_frames: int | None = None  # frames in all (neither: the checkpoint's default)

    def sampling(self) -> VideoSampling:
        try:
            return VideoSampling(self.fps, self.num_frames)
        except VideoRequestError as e:
            raise ClientError(str(e)) from None


class MultimodalParams(BaseModel):
    model_config = STRICT
    images: list[NativeImage] = Field(default_factory=list)
    videos: list[NativeVideo] = Field(default_factory=list)  # placed at the family's video tag or <video>


class NativeParameters(BaseModel):
    model_config = STRICT
    do_sample: bool = False
    temperature: float | None = None  # None: the checkpoint's generation_config.json, else 1
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    max_new_tokens: int = 16
    min_new_tokens: int = 1
    ignore_eos: bool = False
    stop_sequences: list[str] | str | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int | None = None
    skip_special_tokens: bool = True
    add_special_tokens: bool = True
    return_details: bool = False  # adds each token's logprob, and the prompt tokens' logprobs
    regular_constraint: str | None = None  # the output matches this regex
    guided_grammar: str | None = None  # ... this Lark or GBNF grammar
    guided_json: Any = None  # ... this JSON schema (an object or JSON text)
    allowed_token_ids: list[int] | None = None
    best_of: int = 1
    n: int = 1
    # Accepted for LightLLM compatibility, not acted on (docs/protocol.md lists them):
    input_penalty: float | None = None
    exponential_decay_length_penalty: Any = None
    add_spaces_between_special_tokens: bool | None = None
    print_eos_token: bool | None = None
    image_max_patch_num: int | None = None
    group_request_id: int | None = None
    suggested_dp_index: int | None = None
    move_kv_to_decode_node: Any = None

    def constraint(self) -> Constraint | None:
        return pick_one({
            "guided_json": None if self.guided_json is None else Constraint(
                "json_schema", schema_text(self.guided_json, "guided_json")),
            "regular_constraint": None if self.regular_constraint is None else Constraint("regex",
                                                                                          self.regular_constraint),
            "guided_grammar": None if self.guided_grammar is None else Constraint("grammar", self.guided_grammar),
        })

    def to_sampling_params(self, defaults: dict) -> SamplingParams:
        """The one mapping of LightLLM's parameter names onto SamplingParams."""
        stops = [self.stop_sequences] if isinstance(self.stop_sequences, str) else list(self.stop_sequences or [])
        return SamplingParams.build(
            defaults, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, do_sample=self.do_sample,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, ignore_eos=self.ignore_eos,
            stop_sequences=stops, stop_token_ids=list(self.stop_token_ids),
            skip_special_tokens=self.skip_special_tokens, logprobs=self.return_details,
            prompt_logprobs=0 if self.return_details else None, allowed_token_ids=self.allowed_token_ids,
            constraint=self.constraint(),
        )


class GenerateRequest(BaseModel):
    model_config = STRICT
    inputs: str | list[int]
    parameters: NativeParameters = Field(default_factory=NativeParameters)
    multimodal_params: MultimodalParams = Field(default_factory=MultimodalParams)


class TokensRequest(BaseModel):
    model_config = STRICT
    text: str
    parameters: dict | None = None
    multimodal_params: MultimodalParams = Field(default_factory=MultimodalParams)


def sampling_params(parameters: NativeParameters, defaults: dict) -> SamplingParams:
    if not (1 <= parameters.n <= MAX_CHOICES and 1 <= parameters.best_of <= MAX_CHOICES):
        raise ClientError(f"n and best_of must be between 1 and {MAX_CHOICES}")
    try:
        return parameters.to_sampling_params(defaults).validate()
    except ValueError as e:
        raise ClientError(str(e)) from None


class NativeAPI:
    def __init__(self, manager: HttpServerManager):
        self.manager = manager
        self.special_ids = set(manager.processor.tokenizer.all_special_ids)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/tokens", self.tokens)
        app.router.add_get("/get_model_name", self.model_name)
        app.router.add_get("/token_load", self.token_load)

    async def prepare(self, request: web.Request):
        req = parse(GenerateRequest, await read_json(request))
        params = self.manager.stop_tokens_by_name(sampling_params(req.parameters, self.manager.sampling_defaults))
        params = await self.manager.check_params(params)
        bounds = self.image_bounds(req.multimodal_params)
        if isinstance(req.inputs, list) and (req.multimodal_params.images or req.multimodal_params.videos):
            raise ClientError("images and videos need a text prompt with placeholders, not token ids")
        images, videos = await self.load_media(req.multimodal_params)
        if isinstance(req.inputs, list):
            if not req.inputs:
                raise ClientError("inputs is an empty list of token ids")
            prepared = self.manager.prepare_ids(req.inputs)
        else:
            prepared = await self.manager.prepare_text(req.inputs, images, req.parameters.add_special_tokens, bounds,
                                                       videos)
        if not prepared.prompt_ids:
            raise ClientError("the prompt is empty")
        params = self.manager.check_length(prepared, params, max_new_explicit=True)
        return req, prepared, params

    def image_bounds(self, params: MultimodalParams) -> list[dict]:
        return [self.manager.pixel_bounds(i.min_pixels, i.max_pixels) for i in params.images]

    async def load_media(self, params: MultimodalParams) -> tuple[list, list]:
        """The images and videos, fetched and decoded concurrently."""
        videos = [(v.type, v.data, v.sampling()) for v in params.videos]
        images = [(i.type, i.data) for i in params.images]
        return tuple(await gather_or_cancel([self.manager.load_images(images), self.manager.load_videos(videos)]))

    async def generate(self, request: web.Request) -> web.Response:
        req, prepared, params = await self.prepare(request)
        count = max(req.parameters.n, req.parameters.best_of)
        states = await self.manager.submit_many(prepared, [params.for_choice(i) for i in range(count)])
        results = await self.manager.collect_all(states, self.collect)
        body = {
            "generated_text": [text for text, _, _, _ in results],
            "count_output_tokens": sum(len(tokens) for _, tokens, _, _ in results),
            "finish_reason": results[0][2],
            "prompt_tokens": len(prepared.prompt_ids),
            "prompt_cache_len": states[0].num_cached_tokens,
        }
        if req.parameters.return_details:
            body["tokens"] = results[0][1]
            body["prompt_token_logprobs"] = self.prompt_json(prepared.prompt_ids, results[0][3])
        return web.json_response(body)

    async def collect(self, state: RequestState) -> tuple[str, list[dict], str, tuple | None]:
        text, tokens, reason, prompt = [], [], None, None
        async with aclosing(self.manager.stream(state)) as outputs:  # closing aborts an unfinished request
            async for out in outputs:
                text.append(out.text)
                tokens.append(self.token_json(out))
                reason = out.finish_reason
                prompt = prompt or out.prompt_logprobs
        return "".join(text), tokens, reason, prompt

    def prompt_json(self, prompt_ids: list[int], logprobs: tuple | None) -> list[dict]:
        """Each prompt token: {"id", "text", "logprob"} (the first one's logprob null; image rows' ids and
        logprobs null)."""
        tokenizer = self.manager.processor.tokenizer
        vocab = len(tokenizer)
        out = []
        for i, token_id in enumerate(prompt_ids):
            lp = logprobs[i] if logprobs and i < len(logprobs) else None
            is_text = token_id < vocab
            out.append({"id": token_id, "text": tokenizer.decode([token_id], skip_special_tokens=False)
                        if is_text else None, "logprob": lp.logprob if lp else None})
        return out

    def token_json(self, out) -> dict:
        return {"id": out.token_id, "text": out.text, "logprob": out.logprob.logprob if out.logprob else None,
                "special": out.token_id in self.special_ids}

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        req, prepared, params = await self.prepare(request)
        if max(req.parameters.n, req.parameters.best_of) > 1:
            raise ClientError("n and best_of > 1 are for /generate only, not for streaming")
        state = await self.manager.submit(prepared, replace(params, prompt_logprobs=None))  # no event carries them
        async with aclosing(self.manager.stream(state)) as outputs:  # closing aborts an unfinished request
            out = await anext(outputs)  # errors before the first token still get a proper status
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            text = []
            try:
                while True:
                    text.append(out.text)
                    await self.send(response, self.event(state, out, "".join(text)))
                    if out.finish_reason is not None:
                        break
                    out = await anext(outputs)
            except RequestFailed as e:  # the headers are out: the error becomes the last event
                await self.send(response, {"error": str(e), "status": e.status, "finished": True,
                                           "finish_reason": "error", "generated_text": "".join(text)})
        await response.write_eof()
        return response

    def event(self, state: RequestState, out, text: str) -> dict:
        token = {**self.token_json(out), "count_output_tokens": out.num_output_tokens,
                 "prompt_tokens": state.prompt_tokens, "prompt_cache_len": state.num_cached_tokens}
        return {"token": token, "generated_text": text if out.finish_reason else None,
                "finished": out.finish_reason is not None, "finish_reason": out.finish_reason, "details": None}

    @staticmethod
    async def send(response: web.StreamResponse, event: dict) -> None:
        await response.write(b"data:" + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")

    async def tokens(self, request: web.Request) -> web.Response:
        req = parse(TokensRequest, await read_json(request))
        bounds = self.image_bounds(req.multimodal_params)
        images, videos = await self.load_media(req.multimodal_params)
        prepared = await self.manager.prepare_text(req.text, images, bounds=bounds, videos=videos)
        return web.json_response({"ntokens": len(prepared.prompt_ids)})

    async def model_name(self, request: web.Request) -> web.Response:
        return web.json_response({"model_name": self.manager.config.model.model_name})

    async def token_load(self, request: web.Request) -> web.Response:
        stat = self.manager.stat
        total = stat("router", "kv_slots_total", 1) or 1
        used = stat("router", "kv_slots_used")
        return web.json_response({
            "current_load": used / total, "logical_max_load": used / total, "dynamic_max_load": used / total,
            "running_requests": stat("router", "running_requests"),
            "waiting_requests": stat("router", "waiting_requests"),
            "kv_slots_used": used, "kv_slots_total": total,
            "embed_cache_held_entries": stat("visualserver", "embed_cache_held_entries"),
            "embed_cache_hits": stat("visualserver", "embed_cache_hits_total"),
            "embed_cache_misses": stat("visualserver", "embed_cache_misses_total"),
            "images_encoded": stat("visualserver", "images_encoded_total"),
        })
