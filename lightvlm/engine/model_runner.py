"""The language model, its KV buffer, and one step: prepare -> forward -> sample.

A ModelRunner holds per-request state only for what it cannot be told cheaply each step: the KV slots
a request owns (in `req_to_slots`, one row per request), its sampling parameters and random
generator, the token history its penalties need, and the token it sampled last (which the next
step's input may name only as PENDING_TOKEN). Everything else arrives in the StepInput. Under tensor
parallelism every rank runs the same step; rank 0 samples, reports, and shares the tokens with the
other ranks.

The sampling rank also owns each request's logit rules (engine/constraints.py: logit_bias,
allowed_token_ids, bad_words, the output grammar) and computes prompt logprobs inside the prefill
(engine/prompt_logprobs.py).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from lightvlm.common.distributed import SINGLE, TPGroup, kv_heads_per_rank
from lightvlm.common.grammar import GrammarCompiler
from lightvlm.common.triton_kernels.ops import triton_installed
from lightvlm.engine import prompt_logprobs
from lightvlm.engine.constraints import (
    GrammarMasks,
    LogitRules,
    add_logit_rules,
    build_rules,
    consume_grammar,
    start_grammar_masks,
)
from lightvlm.engine.decode_graphs import DecodeGraphs
from lightvlm.engine.infer_state import InferState, KVCache, PrefillBatch
from lightvlm.engine.sampler import SamplingBatch, sample
from lightvlm.io_struct import PENDING_TOKEN, ReqInit, StepInput, StepOutput, TokenLogprob
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.weight_loader import build_part


class ImageSource(Protocol):
    """Where image embedding rows come from: held while a request that uses the image is alive."""

    def hold(self, key: str) -> None: ...

    def drop(self, key: str) -> None: ...

    def __getitem__(self, key: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class RunnerConfig:
    num_slots: int  # KV slots (tokens) in the buffer
    max_reqs: int  # requests held at once
    max_len: int  # tokens per request (prompt + output)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    load_workers: int = 1
    graph_max_batch_size: int = 0  # decode steps up to this batch run from CUDA graphs (0: none; see decode_graphs)


@dataclass
class RunnerReq:
    init: ReqInit
    row: int  # row of req_to_slots
    positions: object  # the language model's plan for this request (models.layers.positions)
    num_computed_tokens: int = 0  # tokens whose K/V are written
    generator: torch.Generator | None = None
    draws: int = 0  # samples drawn from `generator` (each one row of the vocabulary)
    seen: torch.Tensor | None = None  # [V] bool, for repetition penalty
    counts: torch.Tensor | None = None  # [V] float, output token counts
    last_token: int | None = None  # sampled by the latest step, not yet fed back
    rules: LogitRules | None = None  # logit_bias, allowed ids, bad words, grammar (sampling rank only)
    prompt_carry: torch.Tensor | None = None  # [V] log-softmax of a prompt chunk's last row (prompt logprobs)

    @property
    def num_outputs(self) -> int:
        """Outputs sampled so far: all but the newest were fed back as inputs (read after the step)."""
        return self.num_computed_tokens - self.init.num_prompt_tokens


class ModelRunner:
    def __init__(self, ckpt: LoadedCheckpoint, config: RunnerConfig, image_store: ImageSource,
                 tp: TPGroup = SINGLE, show_progress: bool = True):
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device)
        self.image_store = image_store
        self.model = build_part(ckpt, "language", tp, config.dtype, config.device, config.load_workers, show_progress)
        text = ckpt.config.text
        self.vocab_size = text.vocab_size
        # image rows carry hash-derived ids; for penalties they count as the family's image token
        self.image_token_id = getattr(ckpt.config, "image_token_id", None)
        kv_heads = kv_heads_per_rank(text.num_kv_heads, tp.size)
        num_graph_reqs = min(config.graph_max_batch_size, config.max_reqs)
        use_graphs = num_graph_reqs > 0 and (self.device.type != "cuda" or triton_installed())  # not over twins
        # with decode graphs, one slot past the pool takes the padding rows' K/V
        self.kv = KVCache.allocate(text.num_layers, config.num_slots + use_graphs, kv_heads, text.head_dim,
                                   config.dtype, self.device)
        self.req_to_slots = torch.zeros(config.max_reqs, config.max_len, dtype=torch.long, device=self.device)
        self.decode_graphs = None
        if use_graphs:
            self.decode_graphs = DecodeGraphs(self.model, self.kv, self.req_to_slots, num_graph_reqs,
                                              self.model.position_dims, pad_slot=config.num_slots,
                                              capture=self.device.type == "cuda")
        self.free_rows = list(range(config.max_reqs - 1, -1, -1))
        self.reqs: dict[int, RunnerReq] = {}
        self.num_prompt_tokens_computed = 0  # prompt tokens this rank ran through the model (not cached)
        # logit rules: only the rank that samples applies them (its tokenizer view builds in the background)
        self.tokenizer = ckpt.processor.tokenizer if tp.is_first else None
        self.grammar_masks = None
        if tp.is_first:
            compiler = GrammarCompiler(self.tokenizer, self.vocab_size, ckpt.eos_token_ids)
            self.grammar_masks = GrammarMasks(compiler, config.max_reqs, background=self.device.type != "cpu")

    # -- request state -------------------------------------------------------------------------

    def _register(self, init: ReqInit) -> None:
        """Take what the request needs; if anything is missing, take nothing and raise."""
        if init.req_id in self.reqs:
            self._release(init.req_id)
        if not self.free_rows:
            raise RuntimeError(f"all {self.config.max_reqs} request rows are in use")
        generator = None
        if init.sampling.seed is not None and not init.sampling.is_greedy:
            generator = torch.Generator(self.device).manual_seed(init.sampling.seed)
        held = []
        try:
            for image in init.images:
                self.image_store.hold(image.key)
                held.append(image.key)
        except Exception:
            for key in held:
                self.image_store.drop(key)
            raise
        positions = self.model.plan_positions(init.num_prompt_tokens, init.images)
        rules = build_rules(init.sampling, self.tokenizer, self.grammar_masks.compiler,
                            self.device) if self.tp.is_first else None
        req = RunnerReq(init=init, row=self.free_rows.pop(), positions=positions, generator=generator, rules=rules)
        if init.sampling.has_penalties:
            req.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            req.counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=self.device)
        if k := len(init.cached_slots):  # a cached prefix: its KV is written, the penalties still see it
            self.req_to_slots[req.row, :k] = torch.tensor(init.cached_slots, dtype=torch.long, device=self.device)
            req.num_computed_tokens = k
            if req.seen is not None:
                self._track_penalty_tokens(req, 0, init.cached_ids)
        self.reqs[init.req_id] = req

    def release(self, req_ids) -> None:
        """Forget finished or preempted requests: their table rows and image references."""
        for req_id in req_ids:
            self._release(req_id)

    def _release(self, req_id: int) -> None:
        req = self.reqs.pop(req_id, None)
        if req is not None:
            self.free_rows.append(req.row)
            for image in req.init.images:
                self.image_store.drop(image.key)

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, step: StepInput, check: Callable[[StepInput], None] | None = None) -> StepOutput:
        """Run one step. A request that cannot be registered, or that makes the step raise when run
        alone, is reported in `failed`; the others get their tokens."""
        self.release(step.released)
        errors = {}
        for init in step.new_reqs:
            try:
                self._register(init)
            except Exception as e:  # noqa: BLE001 (reported to the router, which fails the request)
                errors[init.req_id] = error_text(e)
        for req_id in step.req_ids:  # scheduled before the router heard that an earlier step failed it
            if req_id not in self.reqs:
                errors.setdefault(req_id, "the worker holds no state for this request (an earlier step failed)")
        step = self.fill_pending(step, errors)
        failed = list(errors.items())
        if failed:
            step = select_reqs(step, set(step.req_ids) - errors.keys())
        try:
            out = self._run(step, check) if step.req_ids else StepOutput(req_ids=(), token_ids=())
        except Exception as e:  # noqa: BLE001
            if len(step.req_ids) == 1:
                return StepOutput(req_ids=(), token_ids=(), failed=((step.req_ids[0], error_text(e)), *failed))
            out = self._run_one_by_one(step, check)
        return replace(out, failed=(*out.failed, *failed)) if failed else out

    def fill_pending(self, step: StepInput, errors: dict[int, str]) -> StepInput:
        """PENDING_TOKEN inputs -> the token this runner sampled last for that request. A request with
        none to give is added to `errors`."""
        if PENDING_TOKEN not in step.input_ids:
            return step
        ids, row = list(step.input_ids), 0
        for req_id, n in zip(step.req_ids, step.num_new_tokens):
            req = self.reqs.get(req_id)
            for i in range(row, row + n):
                if ids[i] == PENDING_TOKEN:
                    if req is None or req.last_token is None:
                        errors.setdefault(req_id, "the step's input token was never sampled")
                        break
                    ids[i] = req.last_token
            row += n
        return replace(step, input_ids=tuple(ids))

    def _run_one_by_one(self, step: StepInput, check: Callable[[StepInput], None] | None) -> StepOutput:
        """After a failed step: each request alone, so the culprits fail and nobody else does."""
        outputs, failed = [], []
        for single in split_step(step):
            try:
                outputs.append(self._run(single, check))
            except Exception as e:  # noqa: BLE001
                failed.append((single.req_ids[0], error_text(e)))
        return StepOutput(req_ids=tuple(i for o in outputs for i in o.req_ids),
                          token_ids=tuple(t for o in outputs for t in o.token_ids),
                          logprobs=tuple(lp for o in outputs for lp in (o.logprobs or ())) or None,
                          failed=(*(f for o in outputs for f in o.failed), *failed),
                          finished=tuple(i for o in outputs for i in o.finished),
                          prompt_logprobs=tuple(p for o in outputs for p in o.prompt_logprobs))

    def _run(self, step: StepInput, check: Callable[[StepInput], None] | None) -> StepOutput:
        if check is not None:
            check(step)
        state, sampled_ids = self.prepare(step)
        prompt_chunks, prompt_rows = prompt_logprobs.plan(step, self.reqs, self.vocab_size)
        if prompt_rows:  # the prompt rows first, the sampled rows last
            rows = torch.tensor(prompt_rows, dtype=torch.long, device=self.device)
            state.logit_rows = torch.cat([rows, state.logit_rows])
        if self.grammar_masks is not None:  # filled while the forward runs
            start_grammar_masks(self.grammar_masks, step, self.reqs, sampled_ids)
        if self.decode_graphs is not None and not prompt_rows and self.decode_graphs.fits(state):
            logits = self.decode_graphs.forward(state)
        else:
            logits = self.model(state)
        self._commit(step)  # the step ran through: only now advance what a rerun must not see advanced
        prompt_out = ()
        if prompt_chunks:
            if self.tp.is_first:
                prompt_out = prompt_logprobs.compute(prompt_chunks, logits[:len(prompt_rows)], self.reqs,
                                                     self.vocab_size)
            logits = logits[len(prompt_rows):]
        if not sampled_ids:
            return StepOutput(req_ids=(), token_ids=(), prompt_logprobs=prompt_out)
        # validated parameters: sampling does not fail
        out = self._sample(sampled_ids, logits) if self.tp.is_first else StepOutput(req_ids=(), token_ids=())
        out = replace(out, prompt_logprobs=prompt_out) if prompt_out else out
        tokens = out.token_ids
        if self.tp.size > 1:  # every rank feeds the tokens back in the next step
            shared = torch.tensor(tokens or [0] * len(sampled_ids), dtype=torch.long, device=self.device)
            tokens = self.tp.broadcast(shared).tolist()
        for req_id, token in zip(sampled_ids, tokens):
            self.reqs[req_id].last_token = token
        return out

    def _commit(self, step: StepInput) -> None:
        """Count the step's tokens as cached, and as seen by the penalties (before sampling)."""
        row = 0
        for req_id, n in zip(step.req_ids, step.num_new_tokens):
            req = self.reqs[req_id]
            if req.seen is not None:
                self._track_penalty_tokens(req, req.num_computed_tokens, step.input_ids[row:row + n])
            if req.rules is not None and req.rules.bad_words:
                skip = max(0, req.init.num_prompt_tokens - req.num_computed_tokens)
                req.rules.output_ids.extend(step.input_ids[row + skip:row + n])
            self.num_prompt_tokens_computed += min(n, max(0, req.init.num_prompt_tokens - req.num_computed_tokens))
            req.num_computed_tokens += n
            row += n

    def prepare(self, step: StepInput) -> tuple[InferState, list[int]]:
        """StepInput -> InferState. Changes nothing but the step's own slots, so a failed step can rerun."""
        dev = self.device
        vocab = self.vocab_size
        input_ids = torch.tensor([t if t < vocab else 0 for t in step.input_ids], dtype=torch.long)
        new_slots = torch.tensor(step.new_slots, dtype=torch.long)
        positions, logit_rows, sampled_ids, prefills = [], [], [], []  # prefills: (table row, row, n, start)
        decode_rows, decode_lengths, decode_table_rows, image_rows, image_embeds = [], [], [], [], []
        row = 0
        for req_id, n, samples in zip(step.req_ids, step.num_new_tokens, step.samples):
            req = self.reqs[req_id]
            start = req.num_computed_tokens
            self.req_to_slots[req.row, start:start + n] = new_slots[row:row + n].to(dev)
            positions.append(req.positions.slice(start, n))
            self._collect_images(req, start, n, row, image_rows, image_embeds)
            if n == 1:
                decode_rows.append(row)
                decode_lengths.append(start + 1)
                decode_table_rows.append(req.row)
            else:
                prefills.append((req.row, row, n, start))
            if samples:
                logit_rows.append(row + n - 1)
                sampled_ids.append(req_id)
            row += n
        state = InferState(
            input_ids=input_ids.to(dev),
            positions=torch.cat(positions, dim=-1).to(dev),
            out_slots=new_slots.to(dev),
            kv=self.kv,
            slot_table=self.req_to_slots,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
        )
        if prefills:
            columns = torch.tensor(prefills, dtype=torch.long).t().contiguous().to(dev)  # each row contiguous
            state.prefill = PrefillBatch(*columns, max_num_new=max(n for _, _, n, _ in prefills))
        if decode_rows:
            lengths = torch.tensor(decode_lengths, device=dev)
            longest = max(decode_lengths)
            rows = torch.tensor(decode_table_rows, device=dev)
            first = decode_rows[0]
            contiguous = decode_rows == list(range(first, first + len(decode_rows)))  # a view, not a gather
            state.decode_rows = (slice(first, first + len(decode_rows)) if contiguous
                                 else torch.tensor(decode_rows, dtype=torch.long, device=dev))
            state.decode_slots = self.req_to_slots[rows, :longest]  # past each length: stale slots, masked
            state.decode_lengths = lengths
        if image_rows:
            state.image_rows = torch.cat(image_rows).to(dev)
            state.image_embeds = torch.cat(image_embeds).to(dev)
        return state, sampled_ids

    def _collect_images(self, req: RunnerReq, start: int, n: int, row: int, rows: list, embeds: list) -> None:
        """Image embedding rows that fall inside this step's tokens [start, start + n) of the request."""
        for image in req.init.images:
            lo, hi = max(start, image.offset), min(start + n, image.offset + image.num_rows)
            if lo >= hi:
                continue
            embedding = self.image_store[image.key]
            rows.append(torch.arange(row + lo - start, row + hi - start))
            embeds.append(embedding[lo - image.offset:hi - image.offset])

    def _track_penalty_tokens(self, req: RunnerReq, start: int, ids: tuple[int, ...]) -> None:
        image = -1 if self.image_token_id is None else self.image_token_id
        ids = torch.tensor([t if t < self.vocab_size else image for t in ids], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)
        known = ids >= 0
        req.seen[ids[known]] = True
        outputs = ids[known & (positions >= req.init.num_prompt_tokens)]
        req.counts.index_add_(0, outputs, torch.ones(len(outputs), device=self.device))

    def _sample(self, req_ids: list[int], logits: torch.Tensor) -> StepOutput:
        reqs = [self.reqs[i] for i in req_ids]
        for req in reqs:
            if req.generator is not None:
                # after a preemption the request is registered anew with a fresh generator: skip the
                # draws its earlier outputs used, so the seeded stream goes on where it was
                while req.draws < req.num_outputs:
                    torch.empty(self.vocab_size, device=self.device).exponential_(generator=req.generator)
                    req.draws += 1
                req.draws += 1
        batch = self._sampling_batch(reqs)
        tokens, logprobs, top = sample(logits, batch)
        token_list = tokens.tolist()
        finished, failed = consume_grammar([(r.init.req_id, r.num_outputs, r.rules) for r in reqs], token_list)
        logprob_out = None
        if logprobs is not None:
            chosen = logprobs.tolist()
            top_ids = top.indices.tolist() if top is not None else [[] for _ in reqs]
            top_values = top.values.tolist() if top is not None else [[] for _ in reqs]
            logprob_out = tuple(
                TokenLogprob(t, lp, tuple(zip(ids[:r.init.sampling.top_logprobs], vals[:r.init.sampling.top_logprobs])))
                for r, t, lp, ids, vals in zip(reqs, token_list, chosen, top_ids, top_values))
        return StepOutput(req_ids=tuple(req_ids), token_ids=tuple(token_list), logprobs=logprob_out,
                          failed=failed, finished=finished)

    def _sampling_batch(self, reqs: list[RunnerReq]) -> SamplingBatch:
        dev = self.device
        params = [r.init.sampling for r in reqs]
        batch = SamplingBatch(
            temperature=torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev),
            top_p=torch.tensor([p.top_p for p in params], device=dev),
            top_k=torch.tensor([min(p.top_k, self.vocab_size) if p.top_k > 0 else self.vocab_size for p in params],
                               device=dev),
            min_p=torch.tensor([p.min_p for p in params], device=dev),
            is_greedy=torch.tensor([p.is_greedy for p in params], device=dev),
            generators=[r.generator for r in reqs],
            top_logprobs=max(p.top_logprobs for p in params),
            needs_logprobs=any(p.logprobs for p in params),
        )
        if any(r.seen is not None for r in reqs):
            zeros = torch.zeros(self.vocab_size, device=dev)
            batch.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)
            batch.presence_penalty = torch.tensor([p.presence_penalty for p in params], device=dev)
            batch.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], device=dev)
            batch.seen_mask = torch.stack([r.seen if r.seen is not None else zeros.bool() for r in reqs])
            batch.output_counts = torch.stack([r.counts if r.counts is not None else zeros for r in reqs])
        banned = [(i, r) for i, r in enumerate(reqs) if r.num_outputs < r.init.sampling.min_new_tokens]
        if banned:
            batch.banned = torch.zeros(len(reqs), self.vocab_size, dtype=torch.bool, device=dev)
            for i, r in banned:
                stop_ids = [t for t in (*r.init.eos_token_ids, *r.init.sampling.stop_token_ids) if t < self.vocab_size]
                batch.banned[i, stop_ids] = True
        ruled = [(i, r) for i, r in enumerate(reqs) if r.rules is not None]
        if ruled:
            add_logit_rules(batch, [(i, r.row, r.rules) for i, r in ruled], self.grammar_masks, self.vocab_size)
        return batch


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def select_reqs(step: StepInput, keep: set[int]) -> StepInput:
    """The step with only the requests in `keep` (registration and releases already done)."""
    parts = [single for single in split_step(step) if single.req_ids[0] in keep]
    return StepInput(req_ids=tuple(p.req_ids[0] for p in parts),
                     num_new_tokens=tuple(p.num_new_tokens[0] for p in parts),
                     input_ids=tuple(t for p in parts for t in p.input_ids),
                     new_slots=tuple(t for p in parts for t in p.new_slots),
                     samples=tuple(p.samples[0] for p in parts))


def split_step(step: StepInput) -> list[StepInput]:
    """One StepInput per request, with that request's slice of the flattened tokens and slots."""
    singles, row = [], 0
    for req_id, n, samples in zip(step.req_ids, step.num_new_tokens, step.samples):
        singles.append(replace(step, req_ids=(req_id,), num_new_tokens=(n,), samples=(samples,), new_reqs=(),
                               released=(), input_ids=step.input_ids[row:row + n],
                               new_slots=step.new_slots[row:row + n]))
        row += n
    return singles
