"""Every message that crosses a process boundary. Dataclasses only, no logic, no torch.

Each class names who writes it and who reads it. Field values are plain Python (ints, strings,
tuples, bytes), so they pickle small and rpyc never turns them into remote proxies.
"""

from dataclasses import dataclass

from lightvlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: its cache key and where its embedding rows sit in the prompt ids."""

    key: str
    offset: int
    length: int


# ---- router -> model workers (one StepInput per iteration, the same to every rank) ---------------

@dataclass(frozen=True)
class ReqInit:
    """Sent the first time a request is scheduled (again after a preemption)."""

    req_id: int
    prompt_len: int
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...]
    images: tuple[ImageRef, ...] = ()


@dataclass(frozen=True)
class StepInput:
    """Only the diff: new requests in full, then for every scheduled request its new tokens and the
    KV slots they go to. Flattened lists are in `req_ids` order."""

    req_ids: tuple[int, ...]
    num_new_tokens: tuple[int, ...]
    input_ids: tuple[int, ...]  # the new tokens of every request, flattened
    new_slots: tuple[int, ...]  # one KV slot per new token
    samples: tuple[bool, ...]  # does the request sample a token after this step
    new_reqs: tuple[ReqInit, ...] = ()
    released: tuple[int, ...] = ()  # requests to forget before this step runs (finished, preempted)


@dataclass(frozen=True)
class TokenLogprob:
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
