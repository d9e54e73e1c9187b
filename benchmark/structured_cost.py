"""The cost of JSON-schema-constrained decoding against unconstrained, at batch 1 and 32.

    python -m benchmark.structured_cost --model_dir DIR [--batch_sizes 1 32] [--output_tokens 64]
        [--mask_tokenizer DIR --mask_vocab 151936]

1. Engine: the model runner's loop (as in benchmark.engine_ceiling) decodes `output_tokens` per request,
   once unconstrained and once under a JSON schema that cannot end early (an array of at least 1000
   objects with integer, string, enum and boolean fields), so that both make the same number of
   tokens. Each is run `repeats` times, alternating, and the fastest run of each kept (a shared
   machine varies by more than the difference). Reported: decode ms per step and per token, the
   overhead per token, how long filling the masks took per step and how long sampling waited for
   them (all of the fill when it runs in line, as on the CPU; with `--fill background`, what the
   forward did not hide).
2. Masks alone at a real vocabulary size (optional: any Hugging Face tokenizer folder): the same
   compiler, mask rows, sampler masking and consume on random logits, against sampling without masks.
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import median

import torch

from lightvlm.common.grammar import GrammarCompiler
from lightvlm.engine.constraints import GrammarMasks, LogitRules
from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.engine.req import Req
from lightvlm.engine.sampler import SamplingBatch, sample
from lightvlm.engine.scheduler import Scheduler, SchedulerConfig
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.pipeline import ImageStore
from lightvlm.sampling_params import Constraint, SamplingParams

ITEM = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 99999}, "name": {"type": "string", "maxLength": 12},
    "kind": {"enum": ["book", "film", "song"]}, "ok": {"type": "boolean"}},
    "required": ["id", "name", "kind", "ok"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": ITEM, "minItems": 1000}},
          "required": ["items"], "additionalProperties": False}
CONSTRAINT = Constraint("json_schema", json.dumps(SCHEMA))


class MaskTimer:
    """Time spent filling masks (background thread) and waiting for them (the step's critical path)."""

    def __init__(self, masks: GrammarMasks):
        self.masks = masks
        self.fill_s = self.wait_s = 0.0
        fill, wait = masks._fill, masks.wait

        def timed_fill(todo, bits):
            started = time.perf_counter()
            fill(todo, bits)
            self.fill_s += time.perf_counter() - started

        def timed_wait():
            started = time.perf_counter()
            wait()
            self.wait_s += time.perf_counter() - started

        masks._fill, masks.wait = timed_fill, timed_wait

    def restore(self) -> None:
        del self.masks._fill, self.masks.wait  # the instance's wrappers: the class's methods show again


def decode(runner: ModelRunner, batch_size: int, output_tokens: int, constrained: bool) -> dict:
    scheduler = Scheduler(SchedulerConfig(runner.config.num_slots, 8192, batch_size))
    for i in range(batch_size):
        prompt = [(100 + 7 * i + j) % 600 + 10 for j in range(32)]
        params = SamplingParams(max_new_tokens=output_tokens, ignore_eos=True, do_sample=True, seed=i,
                                constraint=CONSTRAINT if constrained else None)
        scheduler.add(Req(i, prompt, params, 32 + output_tokens))
    timer = MaskTimer(runner.grammar_masks)
    step_s = []
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        is_decode = all(item.num_new_tokens == 1 for item in batch.items)
        started = time.perf_counter()
        out = runner.step(batch.to_step_input())
        if is_decode:
            step_s.append(time.perf_counter() - started)
        assert not out.failed and not out.finished, (out.failed, out.finished)
        scheduler.update(batch, dict(zip(out.req_ids, out.token_ids)))
    runner.release(scheduler.take_released())
    timer.restore()
    steps = len(step_s)
    return {"decode_step_ms": 1000 * sum(step_s) / steps, "decode_step_p50_ms": 1000 * median(step_s),
            "us_per_token": 1e6 * sum(step_s) / (steps * batch_size),
            "mask_fill_ms_per_step": 1000 * timer.fill_s / max(steps, 1),
            "mask_wait_ms_per_step": 1000 * timer.wait_s / max(steps, 1)}


def engine_costs(model_dir: str, batch_sizes: list[int], output_tokens: int, repeats: int = 3,
                 background: bool = False) -> list[dict]:
    ckpt = LoadedCheckpoint.open(model_dir)
    largest = max(batch_sizes)
    runner = ModelRunner(ckpt, RunnerConfig(num_slots=largest * (32 + output_tokens), max_reqs=largest,
                                            max_len=32 + output_tokens), ImageStore(), show_progress=False)
    if background:  # what a GPU runner does; on the CPU the runner fills in line
        runner.grammar_masks._thread = ThreadPoolExecutor(max_workers=1)
    decode(runner, 1, 8, constrained=True)  # warm up (and build the grammar's lazy lexer once)
    rows = []
    for size in batch_sizes:
        runs = {False: [], True: []}
        for _ in range(repeats):
            for constrained in (False, True):
                runs[constrained].append(decode(runner, size, output_tokens, constrained))
        free, json_ = (min(runs[c], key=lambda r: r["decode_step_ms"]) for c in (False, True))
        rows.append({"batch_size": size, "vocab": ckpt.config.text.vocab_size, "fill": "background" if background
                     else "inline", "unconstrained": free, "json_schema": json_,
                     "overhead_us_per_token": json_["us_per_token"] - free["us_per_token"],
                     "overhead_pct": 100 * (json_["decode_step_ms"] / free["decode_step_ms"] - 1)})
    return rows


def mask_costs(tokenizer_dir: str, vocab: int, batch_sizes: list[int], steps: int) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [0]
    compiler = GrammarCompiler(tokenizer, vocab, eos)
    compiler.check(CONSTRAINT.kind, CONSTRAINT.value)
    rows = []
    for size in batch_sizes:
        masks = GrammarMasks(compiler, size, background=False)
        rules = [LogitRules(matcher=compiler.matcher(CONSTRAINT.kind, CONSTRAINT.value)) for _ in range(size)]
        rows_t = torch.arange(size)
        generator = torch.Generator().manual_seed(0)
        batch = SamplingBatch(temperature=torch.ones(size), top_p=torch.ones(size), top_k=torch.full((size,), vocab),
                              min_p=torch.zeros(size), is_greedy=torch.ones(size, dtype=torch.bool),
                              generators=[None] * size)
        fill, apply, consume, free = [], [], [], []
        for step in range(steps):
            logits = torch.randn(size, vocab, generator=generator)
            t0 = time.perf_counter()
            sample(logits, batch)
            t1 = time.perf_counter()
            masks.start(list(enumerate(rules)))
            masks.wait()
            t2 = time.perf_counter()
            batch.grammar = (rows_t, masks.bits[rows_t])
            tokens = sample(logits, batch)[0].tolist()
            batch.grammar = None
            t3 = time.perf_counter()
            for r, token in zip(rules, tokens):
                r.consume(step, token)
                assert r.error is None, r.error
            t4 = time.perf_counter()
            if step:  # the first step builds the lexer lazily
                free.append(t1 - t0)
                fill.append(t2 - t1)
                apply.append(t3 - t2)
                consume.append(t4 - t3)
        us = 1e6 / (steps - 1)
        rows.append({"batch_size": size, "vocab": vocab, "sample_unmasked_us": sum(free) * us,
                     "fill_us": sum(fill) * us, "sample_masked_us": sum(apply) * us, "consume_us": sum(consume) * us,
                     "mask_overhead_us_per_step": (sum(fill) + sum(apply) + sum(consume) - sum(free)) * us})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--output_tokens", type=int, default=64)
    parser.add_argument("--mask_tokenizer", default=None, help="a tokenizer folder for the masks-alone part")
    parser.add_argument("--mask_vocab", type=int, default=None, help="the logits' width there (default: its size)")
    parser.add_argument("--mask_steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fill", choices=["inline", "background"], default="inline",
                        help="fill the masks in line (the CPU runner's way) or in a thread during the forward (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in engine_costs(args.model_dir, args.batch_sizes, args.output_tokens, args.repeats,
                            args.fill == "background"):
        print(json.dumps({"part": "engine", **row}))
    if args.mask_tokenizer:
        from transformers import AutoTokenizer

        vocab = args.mask_vocab or len(AutoTokenizer.from_pretrained(args.mask_tokenizer))
        for row in mask_costs(args.mask_tokenizer, vocab, args.batch_sizes, args.mask_steps):
            print(json.dumps({"part": "masks", **row}))


if __name__ == "__main__":
    main()
