"""The httpserver's request states: prepare (images, videos, tokens), submit, and stream back text.

Everything CPU-heavy (decoding images and videos, hashing, tokenizing, writing shared memory) runs in a
thread pool, never on the event loop. A request that ends early for any reason (client gone, error) sends an
AbortReq so every room frees what it holds, and unlinks image bytes it wrote but never handed over.
"""

import asyncio
import functools
import itertools
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import zmq
import zmq.asyncio

from lightvlm.common import shm
from lightvlm.common.errors import StartupError
from lightvlm.common.grammar import GrammarCompiler, GrammarError
from lightvlm.common.identity import image_key, video_part_key
from lightvlm.common.logging import get_logger
from lightvlm.common.video import VideoError
from lightvlm.config import ServerConfig
from lightvlm.io_struct import AbortReq, GenerateReq, ImageItem, ReqError, RoomStats, TextOut
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.processor import PromptError, generation_defaults
from lightvlm.models.video import VideoSampling
from lightvlm.sampling_params import SamplingParams
from lightvlm.server.httpserver.media import ImageData, ImageError, MediaLimits, MediaLoader
from lightvlm.server.httpserver.metrics import Metrics
from lightvlm.server.httpserver.video import LoadedVideo, VideoLoader

logger = get_logger(__name__)

FETCHES_PER_REQUEST = 4  # media URLs one request fetches at a time

HEARTBEAT_TIMEOUT = 10.0  # seconds without a room's stats before /health says 503


class ClientError(ValueError):
    """A request the client must fix: answered with `status` (400 unless a subclass says otherwise)."""

    status = 400


class RequestFailed(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def gather_or_cancel(coroutines) -> list:
    """asyncio.gather, but the first failure (or our own cancellation) cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Prepared:
    prompt_ids: list[int]
    images: list[ImageItem] = field(default_factory=list)  # placed and named (images and video parts)
    image_data: list = field(default_factory=list)  # each item's file bytes or frames, written to shm at submission


@dataclass
class RequestState:
    req_id: int
    prompt_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    shm_names: list[str] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False
    num_cached_tokens: int = 0  # prompt tokens the router found in the prefix cache (from the latest TextOut)


class HttpServerManager:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="http-cpu")
        ckpt = LoadedCheckpoint.open(config.model.model_dir)
        try:
            self.processor = ckpt.processor.with_pixel_bounds(config.visual.min_pixels, config.visual.max_pixels)
        except ValueError as e:
            raise StartupError(str(e)) from None
        self.vocab_size = ckpt.config.text.vocab_size  # the logits' width: token ids in requests stay below
        # output constraints are compiled here first, so that a bad one is a 400 (common/grammar.py)
        self.grammar = GrammarCompiler(self.processor.tokenizer, self.vocab_size, ckpt.eos_token_ids)
        self.max_len = ckpt.context_limit(config.router.max_req_total_len)
        self.sampling_defaults = generation_defaults(config.model.model_dir)
        http = config.http
        self.media = MediaLoader(MediaLimits(
            http.image_fetch_timeout, http.max_image_bytes, http.max_image_pixels,
            allow_private=http.allow_private_media_urls, allowed_domains=http.allowed_media_domains,
            local_path=http.allowed_local_media_path), self.executor)
        self.videos = VideoLoader(self.media, http, self.processor, self.executor)
        self.metrics = Metrics(config.model.model_name)
        self.added_tokens = dict(self.processor.tokenizer.get_added_vocab())
        self.states: dict[int, RequestState] = {}
        self.room_reports: dict[str, RoomStats] = {}  # each room's latest, also its heartbeat
        self.room_seen: dict[str, float] = {}
        self.ids = itertools.count(1)
        self.context = zmq.asyncio.Context()
        target = "visualserver" if config.visual.enabled else "router"
        self.outbox = self.context.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 0)
        self.outbox.connect(config.runtime.endpoint(target))
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.bind(config.runtime.endpoint("httpserver"))
        self.receiver: asyncio.Task | None = None
        self.refusal: str | None = None  # set by fail_all: why a request that reaches submit is a 503

    async def start(self) -> None:
        self.receiver = asyncio.create_task(self.receive_loop())

    async def close(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()
        await self.media.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for state in self.states.values():
            for name in state.shm_names:
                shm.unlink(name)

    # -- health --------------------------------------------------------------------------------

    @property
    def expected_rooms(self) -> list[str]:
        rooms = ["router", "detokenization"]
        return rooms + ["visualserver"] if self.config.visual.enabled else rooms

    def unhealthy_rooms(self) -> list[str]:
        now = time.monotonic()
        return [r for r in self.expected_rooms if now - self.room_seen.get(r, -HEARTBEAT_TIMEOUT) > HEARTBEAT_TIMEOUT]

    def stat(self, room: str, name: str, default: float = 0) -> float:
        report = self.room_reports.get(room)
        return next((value for key, value in report.values if key == name), default) if report else default

    # -- preparing a request -------------------------------------------------------------------

    def check_media_count(self, kind: str, count: int) -> None:
        """--limit_mm_per_prompt, before anything is fetched."""
        if count > self.config.http.mm_limit(kind):
            raise ClientError(f"the request has {count} {kind}s; this server takes at most "
                              f"{self.config.http.mm_limit(kind)} per request (--limit_mm_per_prompt)")

    async def load_images(self, sources: list[tuple[str, str]]) -> list[ImageData]:
        """(kind, data) pairs -> checked images, fetched concurrently, a few at a time (so that no
        request fills the fetch pool all requests share)."""
        if sources and not self.config.visual.enabled:
            raise ClientError("this server was started without --enable_multimodal and accepts no images")
        self.check_media_count("image", len(sources))
        gate = asyncio.Semaphore(FETCHES_PER_REQUEST)

        async def load(kind: str, data: str) -> ImageData:
            async with gate:
                return await self.media.load(kind, data)
        try:
            return list(await gather_or_cancel(load(kind, data) for kind, data in sources))
        except ImageError as e:
            self.metrics.images_rejected.labels(reason=e.reason).inc()
            raise ClientError(str(e)) from None

    async def load_videos(self, sources: list[tuple[str, str, VideoSampling]]) -> list[LoadedVideo]:
        """(kind, data, sampling) triples -> decoded, sampled videos, fetched and decoded concurrently."""
        if sources and not self.config.visual.enabled:
            raise ClientError("this server was started without --enable_multimodal and accepts no videos")
        if sources and self.processor.video_refusal:
            raise ClientError(self.processor.video_refusal)
        self.check_media_count("video", len(sources))
        gate = asyncio.Semaphore(FETCHES_PER_REQUEST)

        async def load(*source) -> LoadedVideo:
            async with gate:
                return await self.videos.load(*source)
        try:
            return list(await gather_or_cancel(load(*source) for source in sources))
        except (ImageError, VideoError) as e:
            self.metrics.videos_rejected.labels(reason=e.reason).inc()
            raise ClientError(str(e)) from None
        except PromptError as e:  # sampling settings that do not fit the video
            self.metrics.videos_rejected.labels(reason="bad_sampling").inc()
            raise ClientError(str(e)) from None

    def pixel_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
        """One image's requested resolution bounds, checked against the server's (400 if not allowed)."""
        try:
            return self.processor.check_pixel_bounds(min_pixels, max_pixels)
        except PromptError as e:
            raise ClientError(str(e)) from None

    async def prepare_text(self, text: str, images: list[ImageData], add_special_tokens: bool = True,
                           bounds: list[dict] | None = None, videos: list[LoadedVideo] = ()) -> Prepared:
        return await self._run(self._prepare, self.processor.encode, text, images, bounds, videos,
                               add_special_tokens)

    async def prepare_chat(self, messages: list[dict], images: list[ImageData], bounds: list[dict] | None = None,
                           videos: list[LoadedVideo] = (), add_generation_prompt: bool = True,
                           tools: list | None = None, template_kwargs: dict | None = None) -> Prepared:
        encode = functools.partial(self.processor.encode_chat, add_generation_prompt=add_generation_prompt,
                                   tools=tools, **(template_kwargs or {}))
        return await self._run(self._prepare, encode, messages, images, bounds, videos)

    def _prepare(self, encode, first, images: list[ImageData], bounds: list[dict] | None,
                 videos: list[LoadedVideo], *args) -> Prepared:
        """Lay each image out (its grid, within its `bounds` from pixel_bounds) and each video (its parts),
        build the prompt ids around the spans, name each image and video part."""
        processor = self.processor
        bounds = bounds or [{}] * len(images)
        try:
            grids = [processor.image_grid(im.width, im.height, **b) for im, b in zip(images, bounds)]
            prompt = encode(first, grids, *args, videos=[video.meta for video in videos])
        except PromptError as e:
            raise ClientError(str(e)) from None
        except Exception as e:  # jinja errors and the like: the messages do not fit the template
            raise ClientError(f"could not build the prompt: {type(e).__name__}: {e}") from None
        prepared = Prepared(prompt.input_ids)
        for item, origin in zip(prompt.images, prompt.origins):
            if origin.kind == "image":
                image = images[origin.index]
                prepared.images.append(replace(item, key=image_key(image.digest, processor.settings, item.grid)))
                prepared.image_data.append(image.data)
                continue
            video = videos[origin.index]
            indices = tuple(video.meta.frame_indices[i] for i in origin.part.frames)
            key = video_part_key(video.digest, indices, video.meta.fps, processor.video_settings, item.grid)
            prepared.images.append(replace(item, key=key))
            prepared.image_data.append(video.part_frames(origin.part.frames))
        return prepared

    def prepare_ids(self, ids: list[int]) -> Prepared:
        """A prompt given as token ids (text only): every id must be in the vocabulary."""
        vocab = len(self.processor.tokenizer)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise ClientError(f"token ids must be in [0, {vocab}), got {bad[:5]}")
        return Prepared(list(ids))

    def stop_tokens_by_name(self, params: SamplingParams) -> SamplingParams:
        """A stop sequence that names a special token (LightLLM clients write " <|im_end|>", with a
        leading space) becomes a stop token id: special tokens never reach the text to be matched."""
        names = [stop for stop in params.stop_sequences if stop.strip() in self.added_tokens]
        return replace(params, stop_sequences=[stop for stop in params.stop_sequences if stop not in names],
                       stop_token_ids=[*params.stop_token_ids, *(self.added_tokens[n.strip()] for n in names)])

    def check_length(self, prepared: Prepared, params: SamplingParams, max_new_explicit: bool) -> SamplingParams:
        """Prompt + max_new_tokens must fit --max_req_total_len; without an explicit max, use the rest."""
        limit = self.max_len
        room = limit - len(prepared.prompt_ids)
        if room < 1:
            raise ClientError(f"the prompt has {len(prepared.prompt_ids)} tokens (image tokens included); "
                              f"the limit for prompt + output is {limit} (--max_req_total_len)")
        if max_new_explicit and params.max_new_tokens > room:
            raise ClientError(f"prompt ({len(prepared.prompt_ids)} tokens) + max_new_tokens "
                              f"({params.max_new_tokens}) exceeds the limit of {limit} (--max_req_total_len)")
        max_new = params.max_new_tokens if max_new_explicit else room
        return replace(params, max_new_tokens=max_new, min_new_tokens=min(params.min_new_tokens, max_new))

    async def check_params(self, params: SamplingParams) -> SamplingParams:
        """Ranges, token ids against the vocabulary, and the output constraint compiled: each a 400."""
        try:
            params.validate(self.vocab_size)
            if params.constraint is not None:
                await self._run(self.grammar.check, params.constraint.kind, params.constraint.value)
        except (ValueError, GrammarError) as e:
            raise ClientError(str(e)) from None
        return params

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- running it ----------------------------------------------------------------------------

    async def submit(self, prepared: Prepared, params: SamplingParams) -> RequestState:
        if self.refusal is not None:
            raise RequestFailed(503, self.refusal)
        state = RequestState(next(self.ids), len(prepared.prompt_ids))
        self.states[state.req_id] = state
        items = []
        try:
            for i, (item, data) in enumerate(zip(prepared.images, prepared.image_data)):
                name = shm.bytes_segment(self.config.runtime.shm_prefix, state.req_id, i)
                state.shm_names.append(name)
                num_bytes = await self._run(shm.write_media, name, data)
                items.append(replace(item, shm_name=name, num_bytes=num_bytes))
            await self.outbox.send_pyobj(GenerateReq(state.req_id, tuple(prepared.prompt_ids), params, tuple(items)))
        except BaseException:  # cancelled (client gone) before the hand-over: nothing left behind
            self.states.pop(state.req_id, None)
            for name in state.shm_names:
                shm.unlink(name)
            raise
        state.shm_names = []  # handed over: the visualserver unlinks them
        self.metrics.requests_in_flight.inc()
        return state

    async def submit_many(self, prepared: Prepared, params: list[SamplingParams]) -> list[RequestState]:
        """Submit one request per params (n choices); if that is interrupted, abort those already sent."""
        states = []
        try:
            for p in params:
                states.append(await self.submit(prepared, p))
        except BaseException:
            for state in states:
                await self.abort(state)
            raise
        return states

    async def collect_all(self, states: list[RequestState], collect) -> list:
        """collect(state) for every choice at once; if one fails or the client leaves, abort the rest."""
        try:
            return await gather_or_cancel(collect(state) for state in states)
        finally:
            for state in states:
                await self.abort(state)

    async def stream(self, state: RequestState) -> AsyncIterator[TextOut]:
        """TextOut pieces until the request finishes; raises RequestFailed on a room's error."""
        try:
            while True:
                out = await state.queue.get()
                if isinstance(out, ReqError):  # the room that failed it has released everything
                    state.done = True
                    self.metrics.finish(state, f"error_{out.status}")
                    raise RequestFailed(out.status, out.message)
                self.metrics.token(state)
                state.num_cached_tokens = out.num_cached_tokens
                if out.finish_reason is not None:  # done before the last yield: a caller that stops reading
                    self.metrics.finish(state, out.finish_reason)  # after it must not count an abort
                    state.done = True
                    yield out
                    return
                yield out
        finally:
            self.states.pop(state.req_id, None)
            if not state.done:
                await self.abort(state)

    async def abort(self, state: RequestState) -> None:
        """Tell every room to drop an unfinished request (a no-op once it finished)."""
        if state.done:
            return
        state.done = True
        self.states.pop(state.req_id, None)
        await self.outbox.send_pyobj(AbortReq(state.req_id))
        self.metrics.finish(state, "abort")

    def fail_all(self, status: int, message: str) -> None:
        """End every submitted request with `message` (the server is stopping) and refuse new ones; each
        face answers the ReqError in its own format (the launcher stops the other rooms right after)."""
        self.refusal = message
        for state in list(self.states.values()):
            state.queue.put_nowait(ReqError(state.req_id, status, message))

    async def receive_loop(self) -> None:
        while True:
            message = await self.inbox.recv_pyobj()
            for item in message if isinstance(message, list) else [message]:
                if isinstance(item, RoomStats):
                    self.room_reports[item.room] = item
                    self.room_seen[item.room] = time.monotonic()
                elif (state := self.states.get(item.req_id)) is not None:
                    state.queue.put_nowait(item)
