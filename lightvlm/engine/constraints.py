"""Per-request logit rules on the worker rank that samples: logit_bias, allowed_token_ids, bad_words
and the output grammar (structured outputs), turned into the tensors the sampler applies.

The grammar's mask for a request's next token exists only once its previous token is known, which
under the router's one-step-ahead scheduling is when this rank sampled it. So the token is consumed
right after sampling, and the next mask is filled before the next sampling: on a GPU in a background
thread while the model's forward runs (llguidance drops the GIL), so that it costs the step nothing
unless it takes longer than the forward; on the CPU, where the forward already has every core, in
line just before the forward (a thread there only fights the forward's threads for the cores).
Requests without rules add nothing to a step.

A preempted request comes back registered anew, with a fresh matcher: the outputs it recomputes arrive
as its prompt-chunk inputs and are consumed before its mask is filled (`start_grammar_masks`).
"""

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lightvlm.common.grammar import GrammarCompiler
from lightvlm.engine.sampler import SamplingBatch
from lightvlm.io_struct import StepInput
from lightvlm.sampling_params import SamplingParams


def bad_words_ids(tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    """Each word as tokens, alone and after a space (vLLM's rule: the spaced form counts when its
    first token differs and it has as many tokens)."""
    sequences = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        sequences.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    return [s for s in dict.fromkeys(sequences) if s]


@dataclass
class LogitRules:
    """One request's rules, built when it is registered on the sampling rank."""

    bias_ids: torch.Tensor | None = None  # [k] long
    bias_values: torch.Tensor | None = None  # [k] float
    allowed_ids: torch.Tensor | None = None  # [k] long
    bad_words: list[tuple[int, ...]] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)  # outputs fed back so far (for bad words)
    matcher: object | None = None  # llguidance.LLMatcher
    num_consumed: int = 0  # outputs the matcher has consumed
    mask_ready: bool = False  # the mask row holds the mask for the matcher's current state
    error: str | None = None

    @property
    def is_complete(self) -> bool:
        """The grammar accepts nothing more: the request ends with the token just consumed."""
        return self.matcher is not None and self.matcher.is_stopped() and not self.matcher.is_error()

    def banned_now(self) -> list[int]:
        """Bad words whose earlier tokens the outputs end with: their last token may not come next."""
        banned = []
        for word in self.bad_words:
            prefix = word[:-1]
            if not prefix or tuple(self.output_ids[-len(prefix):]) == prefix:
                banned.append(word[-1])
        return banned

    def consume(self, index: int, token: int) -> None:
        """Output `index` is `token`; a no-op for outputs already consumed and after the grammar ended."""
        if self.matcher is None or index < self.num_consumed:
            return
        self.num_consumed = index + 1
        if self.matcher.is_stopped():  # a token sampled by the step scheduled before the end was known
            return
        self.mask_ready = False
        if not self.matcher.consume_token(token):
            self.error = self.matcher.get_error().splitlines()[0] if self.matcher.get_error() else "rejected"


class GrammarMasks:
    """Token masks of the requests with a grammar, one int32 row (32 ids a word) per request row of
    the runner, filled in a background thread."""

    def __init__(self, compiler: GrammarCompiler, max_reqs: int, background: bool = True):
        import llguidance as llg

        self.compiler = compiler
        self.max_reqs = max_reqs
        self._bits: torch.Tensor | None = None
        self._executor = llg.LLExecutor(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks") if background else None
        self._job: Future | None = None

    @property
    def bits(self) -> torch.Tensor:
        if self._bits is None:  # the width is known once the tokenizer view is built
            self._bits = torch.full((self.max_reqs, self.compiler.mask_width), -1, dtype=torch.int32)
        return self._bits

    def start(self, rows: list[tuple[int, LogitRules]]) -> None:
        """Fill, in the background, the masks of these (row, rules) whose mask is stale."""
        self.wait()
        todo = [(row, rules) for row, rules in rows if not rules.mask_ready and rules.error is None]
        if todo and self._thread is None:
            self._fill(todo, self.bits)
        elif todo:
            self._job = self._thread.submit(self._fill, todo, self.bits)

    def wait(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

    def _fill(self, todo: list[tuple[int, LogitRules]], bits: torch.Tensor) -> None:
        # what llguidance.torch.fill_next_token_bitmask_par does, without importing that module: it
        # pulls in torch.compile (seconds) for a helper we do not use
        rows, width = bits.shape
        self._executor.unsafe_compute_mask_ptr([(rules.matcher, row) for row, rules in todo], bits.data_ptr(),
                                               width * 4, rows)
        for _, rules in todo:
            rules.mask_ready = True


def build_rules(params: SamplingParams, tokenizer, compiler: GrammarCompiler | None, device) -> LogitRules | None:
    """The rules of a request being registered (None when it has none). Raises ValueError (from the
    grammar compiler) if its constraint cannot be compiled: the httpserver checked it, so only a
    pipeline user sees that."""
    if not params.has_logit_rules:
        return None
    rules = LogitRules()
    if params.logit_bias:
        ids = sorted(params.logit_bias)
        rules.bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
        rules.bias_values = torch.tensor([float(params.logit_bias[i]) for i in ids], device=device)
    if params.allowed_token_ids:
        rules.allowed_ids = torch.tensor(sorted(set(params.allowed_token_ids)), dtype=torch.long, device=device)
    if params.bad_words:
        rules.bad_words = bad_words_ids(tokenizer, params.bad_words)
    if params.constraint is not None:
        rules.matcher = compiler.matcher(params.constraint.kind, params.constraint.value)
    return rules


# -- what the model runner calls each step ------------------------------------------------------------

def start_grammar_masks(masks: GrammarMasks, step: StepInput, reqs: dict, sampled_ids: list[int]) -> None:
    """Before the forward: consume the outputs a recomputed request brings back as inputs, then start
    filling the masks of the grammar requests that sample in this step."""
    row = 0
    for req_id, n in zip(step.req_ids, step.num_new_tokens):
        req = reqs[req_id]
        if req.rules is not None and req.rules.matcher is not None:
            start, num_prompt = req.num_computed_tokens, req.init.num_prompt_tokens
            for position in range(max(start, num_prompt), start + n):
                req.rules.consume(position - num_prompt, step.input_ids[row + position - start])
        row += n
    rows = [(reqs[i].row, reqs[i].rules) for i in sampled_ids
            if reqs[i].rules is not None and reqs[i].rules.matcher is not None]
    if rows:
        masks.start(rows)


def add_logit_rules(batch: SamplingBatch, ruled: list[tuple[int, int, LogitRules]], masks: GrammarMasks | None,
                    vocab: int) -> None:
    """The rules of `ruled` (batch index, runner row, rules) as the batch's bias, allowed, banned and
    grammar tensors."""
    dev = batch.temperature.device
    biased = [(i, rules) for i, _, rules in ruled if rules.bias_ids is not None]
    if biased:
        batch.bias = (torch.cat([torch.full_like(rules.bias_ids, i) for i, rules in biased]),
                      torch.cat([rules.bias_ids for _, rules in biased]),
                      torch.cat([rules.bias_values for _, rules in biased]))
    limited = [(i, rules) for i, _, rules in ruled if rules.allowed_ids is not None]
    if limited:
        allowed = torch.zeros(len(limited), vocab, dtype=torch.bool, device=dev)
        for j, (_, rules) in enumerate(limited):
            allowed[j, rules.allowed_ids] = True
        batch.allowed = (torch.tensor([i for i, _ in limited], device=dev), allowed)
    worded = [(i, [t for t in rules.banned_now() if t < vocab]) for i, _, rules in ruled if rules.bad_words]
    if any(ids for _, ids in worded):
        if batch.banned is None:
            batch.banned = torch.zeros(batch.temperature.shape[0], vocab, dtype=torch.bool, device=dev)
        for i, ids in worded:
            batch.banned[i, ids] = True
    constrained = [(i, row, rules) for i, row, rules in ruled if rules.matcher is not None and rules.error is None]
    if constrained:
        masks.wait()
        stale = [(row, rules) for _, row, rules in constrained if not rules.mask_ready]
        if stale:  # not started ahead (a step run again, one request at a time, after a failure)
            masks.start(stale)
            masks.wait()
        table_rows = torch.tensor([row for _, row, _ in constrained])
        batch.grammar = (torch.tensor([i for i, _, _ in constrained], device=dev), masks.bits[table_rows].to(dev))


def consume_grammar(reqs: list[tuple[int, int, LogitRules | None]], tokens: list[int]) -> tuple[tuple, tuple]:
    """After sampling, feed each grammar (req id, index of the new output, rules) its token. Returns
    (requests whose grammar is complete, (request, error) for those whose grammar rejected it)."""
    finished, failed = [], []
    for (req_id, index, rules), token in zip(reqs, tokens):
        if rules is None or rules.matcher is None or rules.error is not None:
            continue
        rules.consume(index, token)
        if rules.error is not None:
            failed.append((req_id, f"the output grammar rejected token {token}: {rules.error}"))
        elif rules.is_complete:
            finished.append(req_id)
    return tuple(finished), tuple(failed)
