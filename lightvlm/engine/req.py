"""A request as the scheduler sees it: ids, counters, KV slot indices and an ordered status.

Pure Python. State changes only through the named methods; the scheduler calls them.
"""

import time
from dataclasses import dataclass, field
from enum import IntEnum

from lightvlm.common.identity import placeholder_id
from lightvlm.io_struct import PENDING_TOKEN, ImageItem
from lightvlm.sampling_params import SamplingParams


class ReqStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2  # EOS, a stop id or a stop string
    FINISHED_LENGTH = 3  # max_new_tokens or the context limit
    FINISHED_ABORTED = 4  # the client went away, or an error

    @property
    def is_finished(self) -> bool:
        return self >= ReqStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {ReqStatus.FINISHED_STOPPED: "stop", ReqStatus.FINISHED_LENGTH: "length",
                ReqStatus.FINISHED_ABORTED: "abort"}.get(self)


@dataclass
class Req:
    req_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    max_total_len: int  # prompt + outputs never exceed this (the context limit)
    images: tuple[ImageItem, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)  # PENDING_TOKEN where a step in flight samples
    status: ReqStatus = ReqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    kv_slots: list[int] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    # the prefix cache (engine/kv_manager.py), written by the scheduler
    num_cached_tokens: int = 0  # prompt tokens found in the cache when last admitted (not computed)
    cache_handle: object = None  # the tree node this request references, None when it holds none
    num_in_tree: int = 0  # kv_slots[:num_in_tree] are covered by the tree's path
    dup_slots: list[int] = field(default_factory=list)  # of those, the ones the request owns itself

    def __post_init__(self):
        self.prompt_ids = list(self.prompt_ids)
        for image in self.images:  # image identity in token ids (common/identity.py)
            self.prompt_ids[image.offset:image.offset + image.num_rows] = [placeholder_id(image.key)] * image.num_rows

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        if len(self.output_ids) >= self.max_new_tokens:
            return 0  # its last output is never fed back (it may still be in flight)
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_pending(self) -> int:
        """Outputs that steps in flight are sampling (places held at the end of output_ids)."""
        n = 0
        while n < len(self.output_ids) and self.output_ids[-1 - n] == PENDING_TOKEN:
            n += 1
        return n

    @property
    def max_new_tokens(self) -> int:
        return min(self.sampling.max_new_tokens, self.max_total_len - self.num_prompt_tokens)

    @property
    def max_kv_tokens(self) -> int:
        """KV slots this request can hold at most: the last sampled token is never fed back."""
        return self.num_prompt_tokens + self.max_new_tokens - 1

    def token_at(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    def expect_output(self) -> None:
        """A step that samples for this request was scheduled: hold the place of its token."""
        self.output_ids.append(PENDING_TOKEN)

    def append_output(self, token: int) -> None:
        """Record a sampled token (in the oldest place held for it) and decide whether the request is done."""
        if pending := self.num_pending:
            num_out = len(self.output_ids) - pending + 1
            self.output_ids[num_out - 1] = token
        else:
            self.output_ids.append(token)
            num_out = len(self.output_ids)
        if num_out >= self.sampling.min_new_tokens:
            is_eos = not self.sampling.ignore_eos and token in self.eos_token_ids
            if is_eos or token in self.sampling.stop_token_ids:
                self.finish(ReqStatus.FINISHED_STOPPED)
                return
        if num_out >= self.max_new_tokens:
            self.finish(ReqStatus.FINISHED_LENGTH)

    def finish(self, status: ReqStatus) -> None:
        """Done: tokens still in flight past this point are dropped when they arrive."""
        assert status.is_finished
        if not self.status.is_finished:
            self.status = status
        while self.output_ids and self.output_ids[-1] == PENDING_TOKEN:
            self.output_ids.pop()

    def stop_on_string(self) -> None:
        """A stop string matched: that is why it ended, even if the same token reached the length limit."""
        if self.status in (ReqStatus.FINISHED_LENGTH, ReqStatus.RUNNING, ReqStatus.WAITING):
            self.status = ReqStatus.FINISHED_STOPPED

    @property
    def own_slots(self) -> list[int]:
        """KV slots this request frees when it ends (the tree's are released, never freed)."""
        return self.dup_slots + self.kv_slots[self.num_in_tree:]

    def reset_for_recompute(self) -> None:
        """Preempted: the KV is gone, so everything (prompt and outputs so far) is computed again."""
        self.kv_slots = []
        self.num_in_tree, self.dup_slots, self.num_cached_tokens = 0, [], 0
        self.num_computed_tokens = 0
        self.status = ReqStatus.WAITING
        self.num_preemptions += 1
