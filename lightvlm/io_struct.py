"""Every message that crosses a process boundary. Dataclasses only, no logic, no torch.

Each class names who writes it and who reads it. Field values are plain Python (ints, strings,
tuples, bytes), so they pickle small and rpyc never turns them into remote proxies.
"""

from dataclasses import dataclass

from lightvlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class ImageItem:
    """One image of a request, or one part of a video (models/video.py): the one descriptor every room
    uses. The processor places it (offset, num_rows, grid), the httpserver (or the pipeline) names it
    (key) and, on its way to the visualserver only, says where its bytes (or frames) wait in shared
    memory."""

    key: str  # common.identity.image_key / video_part_key: bytes (+ frames) + preprocessing settings + grid
    offset: int  # first embedding row in the prompt ids
    num_rows: int  # embedding rows
    grid: tuple[int, ...]  # the family's layout of the image (InternVL: tile columns, rows; Qwen-VL: t, h, w)
    shm_name: str = ""  # segment holding the image file's bytes, or a video part's frames (common.shm)
    num_bytes: int = 0
    # A video part only (written by the processor): seconds between its temporal patches, which Qwen2.5-VL's
    # M-RoPE spaces by time. Everything else a video needs is in the grid and the segment.
    seconds_per_step: float | None = None


# ---- router -> model workers (one StepInput per iteration, the same to every rank) ---------------

@dataclass(frozen=True)
class ReqInit:
    """Written by the router the first time a request is scheduled (again after a preemption)."""

    req_id: int
    num_prompt_tokens: int
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...]
    images: tuple[ImageItem, ...] = ()
    cached_slots: tuple[int, ...] = ()  # the first len() prompt tokens' KV is already there (prefix cache)
    cached_ids: tuple[int, ...] = ()  # those tokens, when the penalties must see them


# An input token the router cannot know yet: the one the previous step is sampling for that request.
# The router schedules the next step while the workers run this one; each rank fills it in from its
# own record of what it sampled last (see ModelRunner.fill_pending).
PENDING_TOKEN = -1


@dataclass(frozen=True)
class StepInput:
    """Written by the router, read by every worker rank. Only the diff: new requests in full, then for
    every scheduled request its new tokens and the KV slots they go to. Flattened lists are in
    `req_ids` order."""

    req_ids: tuple[int, ...]
    num_new_tokens: tuple[int, ...]
    input_ids: tuple[int, ...]  # the new tokens of every request, flattened (may hold PENDING_TOKEN)
    new_slots: tuple[int, ...]  # one KV slot per new token
    samples: tuple[bool, ...]  # does the request sample a token after this step
    new_reqs: tuple[ReqInit, ...] = ()
    released: tuple[int, ...] = ()  # requests to forget before this step runs (finished, preempted)


@dataclass(frozen=True)
class TokenLogprob:
    """Written by worker rank 0 (inside StepOutput), passed on to detokenization and the httpserver."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely tokens


@dataclass(frozen=True)
class StepOutput:
    """Written by rank 0: one sampled token per request that samples, in step order."""

    req_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    failed: tuple[tuple[int, str], ...] = ()  # (req id, error) for requests the step could not run
    finished: tuple[int, ...] = ()  # requests whose output grammar is complete with the token just sampled
    # prompt logprobs computed in this step: (req id, position of the first, one per prompt token from it)
    prompt_logprobs: tuple[tuple[int, int, tuple[TokenLogprob | None, ...]], ...] = ()


# ---- httpserver -> visualserver -> router ----------------------------------------------------------

@dataclass(frozen=True)
class GenerateReq:
    """Written by the httpserver; the visualserver forwards it once its images are encoded."""

    req_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    images: tuple[ImageItem, ...] = ()


@dataclass(frozen=True)
class AbortReq:
    """The client went away (httpserver), or the request failed; every room frees what it holds."""

    req_id: int


# ---- visualserver manager <-> encoder workers (pickled through rpyc) --------------------------------
# The manager sends a tuple of ImageItems: each image's bytes are in `shm_name`, its rows go to the
# embedding segment named after its key (common.shm.embedding_segment).

@dataclass(frozen=True)
class EncodeResult:
    """Written by encoder rank 0: `error` is None on success; `status` says whose fault a failure is."""

    key: str
    error: str | None = None
    status: int = 500  # 400: the image itself is bad; 500: the encoder failed


# ---- router <-> detokenization / visualserver ------------------------------------------------------

@dataclass(frozen=True)
class DetokReq:
    """Written by the router when it accepts a request: how to turn its ids into text."""

    req_id: int
    skip_special_tokens: bool
    stop_sequences: tuple[str, ...]
    min_new_tokens: int


@dataclass(frozen=True)
class TokenOut:
    """Written by the router: a sampled token, or only the end of a request (token_id None)."""

    req_id: int
    token_id: int | None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" when the request ended
    # on the first token of a request that asked: every prompt token's logprob (the first one None)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed)


@dataclass(frozen=True)
class StopReq:
    """Written by detokenization: a stop string matched, the router ends the request."""

    req_id: int


@dataclass(frozen=True)
class ReleaseImages:
    """Written by the router when a request ends: drop its references to these cache entries."""

    keys: tuple[str, ...]


# ---- anything -> httpserver -----------------------------------------------------------------------

@dataclass(frozen=True)
class TextOut:
    """Written by detokenization: one token's worth of text for the client."""

    req_id: int
    text: str
    token_id: int | None
    num_output_tokens: int
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # passed on from TokenOut
    num_cached_tokens: int = 0  # passed on from TokenOut


@dataclass(frozen=True)
class ReqError:
    """Written by any room that cannot finish a request: the httpserver answers with `status`."""

    req_id: int
    status: int
    message: str


@dataclass(frozen=True)
class RoomStats:
    """Written by every room about once a second and when counters change: heartbeat and metrics."""

    room: str
    values: tuple[tuple[str, float], ...]
    histograms: tuple[tuple, ...] = ()  # (name, bounds, cumulative counts incl. +Inf, sum), see common.stats
