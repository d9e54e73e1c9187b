"""The offline shell: every engine component in one process, one loop (shaped like LMDeploy's).

    from lightvlm import pipeline, GenerationConfig
    pipe = pipeline(model_dir)
    r = pipe(("Describe this image.", pil_image), gen_config=GenerationConfig(max_new_tokens=32))
    rs = pipe([conversation, "text only"])

Prompts: a string; a (text, image) or (text, [images]) tuple (images go before the text); or a
conversation of OpenAI-style messages whose parts are text, image_url (http(s) or data: URL),
{"type": "image", "image": PIL.Image}, video_url ({"url", "fps", "num_frames"}) or {"type": "video",
"video": [PIL frames], "fps": 2} (frames already sampled, at `fps` if given; without it they are
taken as transformers takes frames without metadata). Every prompt goes through the checkpoint's chat
template with the generation prompt added. A list of prompts is a batch.

The loop is the server's loop without the processes: schedule, run the model, sample, update.
`add_request` and `step` are public so that requests can join while others are decoding.
"""

import atexit
import base64
import hashlib
import os
import sys
import types
import urllib.request
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightvlm.common import shm
from lightvlm.common.grammar import GrammarCompiler
from lightvlm.common.identity import content_digest, image_key, video_part_key
from lightvlm.common.video import read_video as decode_video
from lightvlm.config import CpuConfig, ModelConfig, RouterConfig, ServerConfig, load_workers
from lightvlm.engine.detokenizer import Detokenizer
from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req, ReqStatus
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.engine.visual_encoder import VisualEncoder
from lightvlm.io_struct import TokenLogprob
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.frames import frame_pixels
from lightvlm.models.processor import decode_image, generation_defaults, split_media, to_rgb
from lightvlm.models.video import VideoMeta, VideoSampling, VideoSource
from lightvlm.models.weight_loader import resolve_dtype
from lightvlm.sampling_params import SamplingParams
from lightvlm.workers.group import ModelWorkers
from lightvlm.workers.model_worker import start_worker_process
from lightvlm.workers.spawn import Instance, Rooms


@dataclass
class GenerationConfig(SamplingParams):
    """The pipeline's sampling settings (LMDeploy's name): SamplingParams' fields, with 512 new tokens
    by default, `stop_words` for stop strings, and unset (None) fields taking the checkpoint's
    generation_config.json values, else the usual defaults."""

    max_new_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_words: list[str] = field(default_factory=list)

    def to_sampling_params(self, defaults: dict) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in fields(SamplingParams)}
        values.update(stop_sequences=[*self.stop_sequences, *self.stop_words],
                      logprobs=self.logprobs or self.top_logprobs > 0)
        return SamplingParams.build(defaults, **values).validate()


@dataclass
class Response:
    text: str
    token_ids: list[int]  # generated ids, ending with the EOS id when generation stopped on it
    finish_reason: str  # "stop" | "length" | "error"
    input_token_len: int  # prompt ids, image rows included
    generate_token_len: int
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # finish_reason "error": the model failed on this request
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with prompt_logprobs set: one per prompt token
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)


def read_image(source) -> tuple[Image.Image, str]:
    """A decoded image and the digest of its identity, from a PIL image, bytes, a data: URL, an http(s)
    URL or a file path. Where there are bytes, the digest is theirs, as in the server; a PIL image
    given as such is named by its pixels."""
    if isinstance(source, Image.Image):
        digest = hashlib.md5(f"{source.mode}:{source.size}:".encode())
        digest.update(source.tobytes())
        return source, "pixels:" + digest.hexdigest()
    data = read_bytes(source)
    return decode_image(data), content_digest(data)


def read_bytes(source) -> bytes:
    """The bytes of a data: URL, an http(s) URL, a file path or bytes."""
    if isinstance(source, (str, Path)) and str(source).startswith("data:"):
        return base64.b64decode(str(source).split(",", 1)[1])
    if isinstance(source, (str, Path)) and str(source).startswith(("http://", "https://")):
        with urllib.request.urlopen(str(source), timeout=30) as response:
            return response.read()
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    if isinstance(source, bytes):
        return source
    raise ValueError(f"cannot read media from {type(source).__name__}")


def read_video_source(video: VideoSource, processor) -> tuple[np.ndarray, VideoMeta, str]:
    """A video part -> (its sampled frames uint8 [n, H, W, 3], how the processor lays them out, the digest
    of its identity). Frames given as images are taken as they are when `fps` says at what rate they were
    sampled, else sampled as transformers samples frames without metadata; a video file is decoded."""
    if video.is_frames:
        frames = [np.asarray(to_rgb(frame)) for frame in video.source]
        if not frames or len({f.shape for f in frames}) != 1:
            raise ValueError("a video's frames must be one or more images of one size")
        stacked = np.stack(frames)
        fps = video.sampling.fps
        indices = tuple(range(len(frames))) if fps is not None else processor.sample_frames(len(frames), None,
                                                                                          VideoSampling())
        digest = hashlib.md5(f"frames:{stacked.shape}:".encode())
        digest.update(stacked.tobytes())
        meta = VideoMeta(len(frames), fps, stacked.shape[2], stacked.shape[1], indices)
        return stacked[list(indices)], meta, "pixels:" + digest.hexdigest()
    data = read_bytes(video.source)
    decoded = decode_video(data, lambda total, fps: processor.sample_frames(total, fps, video.sampling))
    meta = VideoMeta(decoded.total_frames, decoded.fps, decoded.width, decoded.height, decoded.indices)
    return decoded.frames, meta, content_digest(data)


def to_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, tuple):
        text, images = prompt
        images = images if isinstance(images, list) else [images]
        parts = [{"type": "image", "image": image} for image in images]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise ValueError(f"unsupported prompt type {type(prompt).__name__}: use a string, a (text, image) tuple "
                     "or a list of messages")


def is_batch(prompts) -> bool:
    return isinstance(prompts, list) and not all(isinstance(m, dict) for m in prompts)


class ImageStore(dict):
    """Image key -> embedding rows, with a count of the requests holding each entry."""

    def __init__(self):
        super().__init__()
        self.holders: dict[str, int] = {}

    def hold(self, key: str) -> None:
        self.holders[key] = self.holders.get(key, 0) + 1

    def drop(self, key: str) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            if key in self:
                del self[key]


class SharedImageStore(ImageStore):
    """For tp > 1: embedding rows also written to shared memory, where the model workers read them
    (the same segments the server's visualserver writes)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def __setitem__(self, key: str, embeds: torch.Tensor) -> None:
        super().__setitem__(key, embeds)
        nbytes = shm.embeddings_nbytes(embeds.shape[0], embeds.shape[1], embeds.dtype)
        segment = shm.create(shm.embedding_segment(self.prefix, key), nbytes)
        shm.write_embeddings(segment.buf, embeds)
        segment.close()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        shm.unlink(shm.embedding_segment(self.prefix, key))  # workers that map it keep their view until done


class RemoteRunner:
    """The model runner split over `tp` worker processes: the same model workers the server runs,
    driven the way its router drives them. Same interface as ModelRunner for the pipeline's loop."""

    def __init__(self, model_dir: str | Path, tp: int, config: RunnerConfig, data_type: str):
        server_config = ServerConfig(
            model=ModelConfig(str(model_dir), Path(model_dir).name, tp=tp, data_type=data_type, device=config.device,
                              load_workers=config.load_workers, graph_max_batch_size=config.graph_max_batch_size),
            router=RouterConfig(max_total_token_num=config.num_slots, max_req_total_len=config.max_len,
                                running_max_req_size=config.max_reqs),
            cpu=CpuConfig(cores=os.cpu_count() or 1))
        self.instance = Instance(server_config, tp)
        server_config = self.instance.config
        self.prefix = server_config.runtime.shm_prefix
        self.rooms = Rooms()
        try:
            self.rooms.wait_ready([self.rooms.start(f"worker{r}", start_worker_process, server_config, r)
                                   for r in range(tp)])
        except BaseException:
            self.rooms.stop(5.0)
            self.instance.close()
            raise
        self.workers = ModelWorkers(list(server_config.runtime.worker_ports))
        self.released: list[int] = []

    def step(self, step):
        if self.released:
            step = replace(step, released=(*self.released, *step.released))
            self.released = []
        return self.workers.step(step)

    def release(self, req_ids) -> None:
        self.released.extend(req_ids)  # told with the next step

    def close(self) -> None:
        self.workers.close()
        self.rooms.stop(5.0)
        self.instance.close()


class Pipeline:
    def __init__(self, model_dir: str | Path, tp: int = 1, max_batch_size: int = 64, session_len: int | None = None,
                 max_total_token_num: int | None = None, batch_max_tokens: int | None = None,
                 data_type: str = "auto", device: str | None = None, show_progress: bool = False,
                 min_pixels: int | None = None, max_pixels: int | None = None, use_prefix_cache: bool = True,
                 cuda_graph: bool = True):
        """tp > 1 runs the language model in `tp` worker processes (torch.distributed: gloo on the CPU,
        NCCL on CUDA); the vision tower and everything else stay in this process. min_pixels /
        max_pixels replace the checkpoint's resolution bounds (dynamic-resolution families only). data_type
        "auto" runs bf16 on CPUs with bf16 matrix units (AMX, AVX512-BF16), fp32 on other CPUs and the
        checkpoint's dtype on CUDA; "fp32", "bf16", "fp16" choose. use_prefix_cache (on, as in the server)
        shares the KV of equal prompt prefixes between requests (engine/kv_manager.py). cuda_graph (CUDA
        only) replays decode steps of up to 64 requests from CUDA graphs (engine/decode_graphs.py)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = LoadedCheckpoint.open(model_dir)
        dtype = resolve_dtype(data_type, device, model_dir)
        self.processor = ckpt.processor.with_pixel_bounds(min_pixels, max_pixels)
        self.sampling_defaults = generation_defaults(model_dir)
        max_positions = ckpt.config.text.max_position_embeddings
        if session_len is not None and session_len > max_positions:
            raise ValueError(f"session_len {session_len} exceeds the model's max_position_embeddings ({max_positions})")
        self.session_len = session_len or max_positions
        num_slots = max_total_token_num or max_batch_size * self.session_len
        self.eos_token_ids = frozenset(ckpt.eos_token_ids)
        workers = load_workers()
        self.visual = VisualEncoder(ckpt, dtype, device, load_workers=workers,
                                    show_progress=show_progress) if ckpt.is_multimodal else None
        graph_max_batch_size = min(max_batch_size, 64) if cuda_graph and torch.device(device).type == "cuda" else 0
        runner_config = RunnerConfig(num_slots=num_slots, max_reqs=max_batch_size, max_len=self.session_len,
                                     dtype=dtype, device=device, load_workers=workers,
                                     graph_max_batch_size=graph_max_batch_size)
        if tp == 1:
            self.images = ImageStore()
            self.runner = ModelRunner(ckpt, runner_config, self.images, show_progress=show_progress)
            self.grammar = self.runner.grammar_masks.compiler  # output constraints, checked before they run
        else:
            self.runner = RemoteRunner(model_dir, tp, runner_config, str(dtype).removeprefix("torch."))
            self.images = SharedImageStore(self.runner.prefix)
            self.grammar = GrammarCompiler(self.processor.tokenizer, ckpt.config.text.vocab_size, ckpt.eos_token_ids)
            atexit.register(self.close)
        self.vocab_size = ckpt.config.text.vocab_size
        self.scheduler = Scheduler(SchedulerConfig(num_slots=num_slots,
                                                   batch_max_tokens=batch_max_tokens or max(self.session_len, 2048),
                                                   running_max_req_size=max_batch_size,
                                                   use_prefix_cache=use_prefix_cache))
        self.detokenizer = Detokenizer(self.processor.tokenizer)
        self._next_id = 0
        self._reqs: dict[int, Req] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}
        self._prompt_logprobs: dict[int, dict[int, TokenLogprob | None]] = {}
        self._errors: dict[int, str] = {}

    def __call__(self, prompts, gen_config: GenerationConfig | None = None):
        batch = is_batch(prompts)
        req_ids = self.add_requests(prompts if batch else [prompts], gen_config)
        done: dict[int, Response] = {}
        while len(done) < len(req_ids):
            done.update((r.index, r) for r in self.step())
        responses = [done[i] for i in req_ids]
        return responses if batch else responses[0]

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, prompt, gen_config: GenerationConfig | None = None) -> int:
        return self.add_requests([prompt], gen_config)[0]

    def add_requests(self, prompts: list, gen_config: GenerationConfig | None = None) -> list[int]:
        """Tokenize, encode every new image in one batch, and queue the requests. Returns their ids."""
        params = (gen_config or GenerationConfig()).to_sampling_params(self.sampling_defaults).validate(self.vocab_size)
        if params.constraint is not None:  # a bad one raises GrammarError (a ValueError) naming the problem
            self.grammar.check(params.constraint.kind, params.constraint.value)
        prepared, todo = [], {}
        for prompt in prompts:
            messages, sources, video_sources = split_media(to_messages(prompt))
            if (sources or video_sources) and self.visual is None:
                raise ValueError("this model takes no images (a text-only language model)")
            if video_sources and self.processor.video_refusal:
                raise ValueError(self.processor.video_refusal)
            images = [read_image(s) for s in sources]
            videos = [read_video_source(v, self.processor) for v in video_sources]
            encoded = self.processor.encode_chat(messages, [self.processor.image_grid(*im.size) for im, _ in images],
                                                 videos=[meta for _, meta, _ in videos])
            if len(encoded.input_ids) >= self.session_len:
                raise ValueError(f"the prompt has {len(encoded.input_ids)} tokens; session_len is {self.session_len}")
            items = []
            for item, origin in zip(encoded.images, encoded.origins):
                if origin.kind == "image":
                    image, digest = images[origin.index]
                    item = replace(item, key=image_key(digest, self.processor.settings, item.grid))
                    source = image
                else:
                    frames, meta, digest = videos[origin.index]
                    indices = tuple(meta.frame_indices[i] for i in origin.part.frames)
                    item = replace(item, key=video_part_key(digest, indices, meta.fps, self.processor.video_settings,
                                                            item.grid))
                    source = frames[list(origin.part.frames)]
                items.append(item)
                if item.key not in self.images:
                    todo[item.key] = (source, item.grid)
            prepared.append((encoded.input_ids, tuple(items)))
        self._encode_images(todo)
        req_ids = []
        for input_ids, items in prepared:
            req = Req(req_id=self._next_id, prompt_ids=input_ids, sampling=params, max_total_len=self.session_len,
                      eos_token_ids=self.eos_token_ids, images=items)
            for item in items:
                self.images.hold(item.key)  # until the response is built; the runner holds it too
            self._next_id += 1
            self._reqs[req.req_id] = req
            self._logprobs[req.req_id] = []
            self.scheduler.add(req)
            self.detokenizer.add(req.req_id, params.skip_special_tokens, params.stop_sequences, params.min_new_tokens)
            req_ids.append(req.req_id)
        return req_ids

    def _encode_images(self, todo: dict[str, tuple[Image.Image | np.ndarray, tuple]]) -> None:
        """Encode every image and video part not in the store yet (key -> (image or frames, grid)) as one batch."""
        if not todo:
            return
        grids = [grid for _, grid in todo.values()]
        pixels = [frame_pixels(self.processor, source, grid) if isinstance(source, np.ndarray)
                  else self.processor.preprocess(source, grid) for source, grid in todo.values()]
        for key, embeds in zip(todo, self.visual.encode(pixels, grids)):
            self.images[key] = embeds

    # -- the loop ------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[Response]:
        """One engine iteration. Returns the requests that finished in it."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        out = self.runner.step(batch.to_step_input())
        failed = []
        for req_id, error in out.failed:  # the model could not run this request: end it, say why
            req = self._reqs[req_id]
            self.scheduler.finish(req, ReqStatus.FINISHED_ABORTED)
            self._errors[req_id] = error
            failed.append(req)
        sampled = dict(zip(out.req_ids, out.token_ids))
        finished = failed + self.scheduler.update(batch, sampled)
        for req_id in out.finished:  # the output grammar is complete: its token just sampled was the last
            req = self._reqs[req_id]
            if not req.status.is_finished:
                self.scheduler.finish(req, ReqStatus.FINISHED_STOPPED)
                finished.append(req)
        for req_id, first, values in out.prompt_logprobs:
            self._prompt_logprobs.setdefault(req_id, {}).update(enumerate(values, start=first))
        for i, (req_id, token) in enumerate(sampled.items()):
            req = self._reqs[req_id]
            if out.logprobs is not None:
                self._logprobs[req_id].append(out.logprobs[i])
            _, stopped = self.detokenizer.push(req_id, token)
            if stopped and not req.status.is_finished:
                self.scheduler.finish(req, ReqStatus.FINISHED_STOPPED)
                finished.append(req)
            elif stopped:
                req.stop_on_string()
        self.runner.release(self.scheduler.take_released())  # in one process, no need to wait a step
        return [self._respond(req) for req in finished]

    def _respond(self, req: Req) -> Response:
        text = self.detokenizer.flush(req.req_id)
        state = self.detokenizer.remove(req.req_id)
        for image in req.images:
            self.images.drop(image.key)
        del self._reqs[req.req_id]
        logprobs = self._logprobs.pop(req.req_id)
        error = self._errors.pop(req.req_id, None)
        prompt = self._prompt_logprobs.pop(req.req_id, {})
        prompt_logprobs = [prompt.get(i) for i in range(req.num_prompt_tokens)]
        return Response(text=state.text if state else text, token_ids=list(req.output_ids),
                        finish_reason="error" if error else req.status.finish_reason,
                        input_token_len=req.num_prompt_tokens, generate_token_len=len(req.output_ids),
                        index=req.req_id, logprobs=logprobs if req.sampling.logprobs else None, error=error,
                        prompt_logprobs=prompt_logprobs if req.sampling.prompt_logprobs is not None else None,
                        cached_tokens=req.num_cached_tokens)


    def close(self) -> None:
        """Stop the worker processes of a tp > 1 pipeline (also done when the interpreter exits)."""
        if isinstance(self.runner, RemoteRunner) and self.runner.workers is not None:
            for key in list(self.images):
                del self.images[key]
            self.runner.close()
            self.runner.workers = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipeline(model_dir: str | Path, **kwargs) -> Pipeline:
    return Pipeline(model_dir, **kwargs)


class _CallableModule(types.ModuleType):
    """`from lightvlm import pipeline` must give something callable even after `lightvlm.pipeline` (this
    module) was imported, which rebinds the package attribute to the module: so the module is callable."""

    def __call__(self, model_dir: str | Path, **kwargs) -> Pipeline:
        return Pipeline(model_dir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
