"""Configuration: the CLI parses once into a frozen ServerConfig that every room receives.

Flag names and meanings follow LightLLM. Environment knobs: INTERNVL_IMAGE_LENGTH (tokens per tile,
read by the InternVL processor) and LOADWORKER (threads reading weight shards).
"""

import argparse
import json
import os
from dataclasses import dataclass, field, replace

MiB = 1 << 20
TOOL_CALL_PARSERS = ("hermes", "internlm")  # the keys of server/httpserver/tool_parsers.TOOL_PARSERS


def env_int(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None
    if number < minimum:
        raise ValueError(f"environment variable {name}={number} must be >= {minimum}")
    return number


def load_workers() -> int:
    """LOADWORKER: threads that read safetensors shards at start-up (default 1)."""
    return env_int("LOADWORKER", 1)


@dataclass(frozen=True)
class ModelConfig:
    model_dir: str
    model_name: str
    tp: int = 1
    data_type: str = "auto"  # auto: bf16 on CPUs with bf16 matrix units, else fp32; the checkpoint's on CUDA
    device: str = "cpu"
    trust_remote_code: bool = False  # accepted for LightLLM compatibility; checkpoint code never runs
    load_workers: int = 1
    graph_max_batch_size: int = 0  # CUDA graphs for decode batches up to this size; 0: none (the CPU, or disabled)


@dataclass(frozen=True)
class RouterConfig:
    max_total_token_num: int | None = None  # KV slots; None: derived from mem_fraction
    mem_fraction: float = 0.9
    max_req_total_len: int | None = None  # prompt + output tokens of one request; None: the model's limit
    # (every room resolves it the same way: LoadedCheckpoint.context_limit)
    batch_max_tokens: int = 512  # tokens computed per step
    running_max_req_size: int = 1000
    use_prefix_cache: bool = True  # share the KV of equal prompt prefixes (engine/kv_manager.py)


@dataclass(frozen=True)
class VisualConfig:
    enabled: bool = False
    infer_batch_size: int = 4  # images per encoder batch
    cache_capacity: int = 200  # embedding cache entries
    cache_max_bytes: int = 2048 * MiB
    dp: int = 1
    tp: int = 1
    min_pixels: int | None = None  # resolution bounds of dynamic-resolution models; None: the checkpoint's
    max_pixels: int | None = None

    @property
    def num_encoder_workers(self) -> int:
        return self.dp * self.tp if self.enabled else 0


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_size: int = 64 * MiB
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    image_fetch_timeout: float = 10.0
    max_image_bytes: int = 32 * MiB
    max_image_pixels: int = 40_000_000
    tool_call_parser: str | None = None  # how tool calls read in the model's output (httpserver/tool_parsers.py)
    max_video_bytes: int = 256 * MiB  # a fetched video file (a base64 one is bounded by max_body_size as well)
    max_video_frames: int = 18_000  # frames one video holds (10 minutes at 30 fps)
    max_video_seconds: float = 600.0
    video_max_pixels: int = 1920 * 1088  # width x height of a frame
    allow_private_media_urls: bool = False  # media URLs may name loopback/private/link-local addresses
    allowed_media_domains: tuple[str, ...] = ()  # media URLs may only name these hosts; empty: any
    allowed_local_media_path: str | None = None  # file:// media URLs below this folder; None: refused
    limit_mm_per_prompt: tuple[tuple[str, int], ...] = (("image", 32), ("video", 2))  # most items per request
    header_timeout: float = 10.0  # seconds a new connection has to send its request headers
    body_timeout: float = 60.0  # seconds a request has to send its whole body
    max_connections: int = 2048  # open client connections; more are answered 503 and closed
    keep_alive_timeout: float = 15.0  # seconds an idle kept-alive connection stays open

    def mm_limit(self, kind: str) -> int:
        return dict(self.limit_mm_per_prompt)[kind]


@dataclass(frozen=True)
class CpuConfig:
    """Torch threads per compute process. None: share the cores dynamically among the processes busy
    at each moment (common/cpu_share.py); a number: that many, always."""

    llm_threads: int | None = None  # per model worker
    visual_threads: int | None = None  # per encoder worker
    cores: int = 1  # what the dynamic share divides


@dataclass(frozen=True)
class RuntimeConfig:
    """Filled by the launcher: where this instance's rooms find each other."""

    instance: str = ""
    ipc_dir: str = ""
    cpu_share: str = ""  # shared-memory table of busy compute processes (see common/cpu_share.py)
    worker_ports: tuple[int, ...] = ()
    visual_ports: tuple[int, ...] = ()
    dist_port: int = 0
    visual_dist_ports: tuple[int, ...] = ()

    def endpoint(self, room: str) -> str:
        return f"ipc://{self.ipc_dir}/{room}"

    @property
    def shm_prefix(self) -> str:
        return f"lvlm{self.instance}_"


@dataclass(frozen=True)
class ServerConfig:
    model: ModelConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log_level: str = "info"
    graceful_shutdown_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM

    def with_runtime(self, runtime: RuntimeConfig) -> "ServerConfig":
        return replace(self, runtime=runtime)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightvlm.server.api_server",
        description="Serve a vision-language model over HTTP (LightLLM's /generate and the OpenAI API).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_dir", default=None,
                   help="Hugging Face checkpoint folder. Without it, a random-weight demo checkpoint is built "
                        "(once, into ~/.cache/lightvlm) and served.")
    g.add_argument("--model_name", default=None, help="name reported by /get_model_name and /v1/models "
                                                      "(default: the folder's name)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel model workers (GPUs; CPU processes)")
    g.add_argument("--data_type", default="auto",
                   choices=["auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   help="weight, activation and KV dtype; logits and sampling are fp32 always. auto: on the CPU "
                        "bf16 where it has AMX or AVX512-BF16, fp32 elsewhere; on CUDA the checkpoint's dtype")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="accepted for compatibility; lightvlm never runs code from the checkpoint")
    g.add_argument("--disable_cuda_graph", action="store_true",
                   help="on CUDA, launch every decode step op by op instead of replaying captured CUDA graphs")
    g.add_argument("--graph_max_batch_size", type=int, default=64,
                   help="on CUDA, decode batches up to this size replay CUDA graphs captured at start-up (sizes "
                        "1, 2, 4, 8, 16, ... padded up); larger batches run op by op. The CPU never captures")
    g = p.add_argument_group("memory and batching")
    g.add_argument("--mem_fraction", type=float, default=0.9,
                   help="share of device memory for weights + KV cache; on the CPU, share of the RAM available "
                        "at start-up given to the KV cache, divided by 4 to leave room for the other processes")
    g.add_argument("--max_total_token_num", type=int, default=None,
                   help="KV cache size in tokens (default: derived from --mem_fraction)")
    g.add_argument("--max_req_total_len", type=int, default=None,
                   help="prompt + output tokens of one request (default: the model's max_position_embeddings)")
    g.add_argument("--batch_max_tokens", type=int, default=None,
                   help="tokens computed in one step, prompt chunks included; longer prompts are prefilled in "
                        "chunks (default: 8192 on GPUs; 512 on the CPU, where a step of 8192 tokens takes seconds "
                        "and would stall every decoding request that long)")
    g.add_argument("--running_max_req_size", type=int, default=1000, help="requests in the running batch")
    g.add_argument("--disable_dynamic_prompt_cache", action="store_true",
                   help="compute every prompt in full (no KV shared between requests with a common prefix)")
    g = p.add_argument_group("multimodal")
    g.add_argument("--enable_multimodal", action="store_true", help="accept images (else text only; images get 400)")
    g.add_argument("--visual_infer_batch_size", type=int, default=4, help="images per vision-encoder batch")
    g.add_argument("--cache_capacity", type=int, default=200, help="image embeddings kept in the cache")
    g.add_argument("--cache_max_mb", type=int, default=2048, help="bytes (in MiB) the embedding cache may hold")
    g.add_argument("--visual_dp", type=int, default=1, help="vision-encoder replicas working in parallel")
    g.add_argument("--visual_tp", type=int, default=1, help="tensor-parallel ranks per vision-encoder replica")
    g.add_argument("--min_pixels", type=int, default=None,
                   help="dynamic-resolution models (Qwen-VL): the fewest pixels an image is resized to (default: "
                        "the checkpoint's); requests may only lower it")
    g.add_argument("--max_pixels", type=int, default=None,
                   help="dynamic-resolution models (Qwen-VL): the most pixels an image is resized to, which bounds "
                        "its tokens (default: the checkpoint's); requests may only lower it")
    g = p.add_argument_group("http")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max_body_size", type=int, default=64 * MiB, help="largest request body in bytes (413 above)")
    g.add_argument("--http_header_timeout", type=float, default=10.0,
                   help="seconds a connection has to send its request headers (then it is closed)")
    g.add_argument("--http_body_timeout", type=float, default=60.0,
                   help="seconds a request has to send its whole body (408 after)")
    g.add_argument("--max_connections", type=int, default=2048,
                   help="most open client connections; a connection over it is answered 503 and closed")
    g.add_argument("--keep_alive_timeout", type=float, default=15.0,
                   help="seconds an idle kept-alive connection stays open")
    g.add_argument("--api_key", default=None, help="require 'Authorization: Bearer <key>' (401 without)")
    g.add_argument("--allow_origins", nargs="*", default=[], help="CORS origins allowed ('*' for any)")
    g.add_argument("--image_fetch_timeout", type=float, default=10.0, help="seconds to download one image URL")
    g.add_argument("--max_image_bytes", type=int, default=32 * MiB, help="largest image file in bytes")
    g.add_argument("--max_image_pixels", type=int, default=40_000_000,
                   help="largest image in pixels, checked from the header before decoding")
    g.add_argument("--tool_call_parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="the model's tool-call format, for `tools` in chat requests: hermes (Qwen2/2.5/3, Hermes) "
                        "or internlm (InternLM2); without it, a request with tools is a 400")
    g.add_argument("--max_video_bytes", type=int, default=256 * MiB, help="largest video file in bytes")
    g.add_argument("--max_video_frames", type=int, default=18_000,
                   help="most frames one video may hold (from its container before decoding, else counted)")
    g.add_argument("--max_video_seconds", type=float, default=600.0,
                   help="longest video in seconds (from its container before decoding, else from its frames)")
    g.add_argument("--video_max_pixels", type=int, default=1920 * 1088,
                   help="largest video frame in pixels (width x height), checked before decoding where the "
                        "container says it")
    g.add_argument("--allow_private_media_urls", action="store_true",
                   help="let media URLs name loopback, private, link-local and reserved addresses (refused by "
                        "default, so that clients cannot make the server fetch from its own network)")
    g.add_argument("--allowed_media_domains", nargs="*", default=[],
                   help="media URLs may only name these hosts (exact names; default: any public host)")
    g.add_argument("--allowed_local_media_path", default=None,
                   help="serve file:// media URLs naming files below this folder (refused without it)")
    g.add_argument("--limit_mm_per_prompt", default=None,
                   help='most images and videos one request may carry, as JSON, e.g. \'{"image": 8, "video": 1}\' '
                        "(default: 32 images, 2 videos); checked before anything is fetched")
    g = p.add_argument_group("cpu")
    g.add_argument("--llm_threads", type=int, default=None,
                   help="torch threads per model worker, always (default: the cores are shared at each step "
                        "among the compute processes busy at that moment, so that together they never "
                        "oversubscribe the cores and none idles while another works)")
    g.add_argument("--visual_threads", type=int, default=None,
                   help="torch threads per vision-encoder worker, always (default: shared as above)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--graceful_shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds running requests get to finish before they are ended with "
                        "an error (new requests get 503 at once)")
    return p


def fail(message: str):
    raise SystemExit(f"lightvlm: {message}")


def check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be >= 1, got {value}")


def local_media_path(path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isdir(path):
        fail(f"--allowed_local_media_path {path!r} is not a folder")
    return os.path.realpath(path)


def mm_limits(text: str | None) -> tuple[tuple[str, int], ...]:
    """--limit_mm_per_prompt's JSON (vLLM's form) -> ((kind, limit), ...), the defaults where it is silent."""
    limits = dict(HttpConfig.limit_mm_per_prompt)
    if text is not None:
        try:
            given = json.loads(text)
        except ValueError:
            fail(f"--limit_mm_per_prompt must be JSON such as '{{\"image\": 8}}', got {text!r}")
        if not isinstance(given, dict) or not set(given) <= set(limits) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in given.values()):
            fail(f"--limit_mm_per_prompt takes counts >= 0 for {sorted(limits)}, got {text!r}")
        limits.update(given)
    return tuple(limits.items())


def parse_config(argv: list[str] | None, model_dir: str, device: str, num_devices: int) -> ServerConfig:
    """argv -> ServerConfig. `model_dir` is resolved by the caller (the demo build happens there). What
    depends on the checkpoint (the context limit, the KV pool's size) is checked by the rooms."""
    args = build_parser().parse_args(argv)
    check_positive(args, "tp", "max_total_token_num", "max_req_total_len", "batch_max_tokens", "running_max_req_size",
                   "visual_infer_batch_size", "cache_capacity", "cache_max_mb", "visual_dp", "visual_tp",
                   "llm_threads", "visual_threads", "graph_max_batch_size",
                   "max_body_size", "max_image_bytes", "max_image_pixels",
                   "min_pixels", "max_pixels", "max_video_bytes", "max_video_frames", "video_max_pixels",
                   "max_connections")
    for name in ("http_header_timeout", "http_body_timeout", "keep_alive_timeout"):
        if getattr(args, name) <= 0:
            fail(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.max_video_seconds <= 0:
        fail(f"--max_video_seconds must be > 0, got {args.max_video_seconds}")
    if not 0 <= args.graceful_shutdown_timeout < float("inf"):
        fail(f"--graceful_shutdown_timeout must be a finite number of seconds >= 0, "
             f"got {args.graceful_shutdown_timeout}")
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        fail(f"--min_pixels {args.min_pixels} is above --max_pixels {args.max_pixels}")
    if not 0 < args.mem_fraction <= 1:
        fail(f"--mem_fraction must be in (0, 1], got {args.mem_fraction}")
    if device == "cuda" and args.tp > num_devices:
        fail(f"--tp {args.tp} asks for {args.tp} GPUs but {num_devices} are visible; lower --tp or expose more GPUs")
    if device == "cuda" and args.enable_multimodal and args.visual_dp * args.visual_tp > num_devices:
        fail(f"--visual_dp {args.visual_dp} x --visual_tp {args.visual_tp} needs more GPUs than the "
             f"{num_devices} visible")
    max_len = args.max_req_total_len
    if args.max_total_token_num is not None and max_len is not None and args.max_total_token_num < max_len:
        fail(f"--max_total_token_num {args.max_total_token_num} is smaller than --max_req_total_len {max_len}: "
             f"one full-length request would never fit; raise --max_total_token_num or lower --max_req_total_len")
    return ServerConfig(
        model=ModelConfig(model_dir=model_dir, model_name=args.model_name or os.path.basename(model_dir.rstrip("/")),
                          tp=args.tp, data_type=args.data_type, device=device,
                          trust_remote_code=args.trust_remote_code, load_workers=load_workers(),
                          graph_max_batch_size=(args.graph_max_batch_size
                                                if device == "cuda" and not args.disable_cuda_graph else 0)),
        router=RouterConfig(max_total_token_num=args.max_total_token_num, mem_fraction=args.mem_fraction,
                            max_req_total_len=max_len,
                            batch_max_tokens=args.batch_max_tokens or (8192 if device == "cuda" else 512),
                            running_max_req_size=args.running_max_req_size,
                            use_prefix_cache=not args.disable_dynamic_prompt_cache),
        visual=VisualConfig(enabled=args.enable_multimodal, infer_batch_size=args.visual_infer_batch_size,
                            cache_capacity=args.cache_capacity, cache_max_bytes=args.cache_max_mb * MiB,
                            dp=args.visual_dp, tp=args.visual_tp, min_pixels=args.min_pixels,
                            max_pixels=args.max_pixels),
        http=HttpConfig(host=args.host, port=args.port, max_body_size=args.max_body_size, api_key=args.api_key,
                        allow_origins=tuple(args.allow_origins), image_fetch_timeout=args.image_fetch_timeout,
                        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                        tool_call_parser=args.tool_call_parser,
                        max_video_bytes=args.max_video_bytes, max_video_frames=args.max_video_frames,
                        max_video_seconds=args.max_video_seconds, video_max_pixels=args.video_max_pixels,
                        allow_private_media_urls=args.allow_private_media_urls,
                        allowed_media_domains=tuple(d.rstrip(".").lower() for d in args.allowed_media_domains),
                        allowed_local_media_path=local_media_path(args.allowed_local_media_path),
                        limit_mm_per_prompt=mm_limits(args.limit_mm_per_prompt),
                        header_timeout=args.http_header_timeout, body_timeout=args.http_body_timeout,
                        max_connections=args.max_connections, keep_alive_timeout=args.keep_alive_timeout),
        cpu=CpuConfig(llm_threads=args.llm_threads, visual_threads=args.visual_threads, cores=os.cpu_count() or 1),
        log_level=args.log_level,
        graceful_shutdown_timeout=args.graceful_shutdown_timeout,
    )
