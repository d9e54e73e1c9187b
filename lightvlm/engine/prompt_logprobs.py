"""Prompt logprobs (OpenAI's `echo` + `logprobs`, vLLM's `prompt_logprobs`): the logprob of every prompt
token given the ones before it, computed inside the request's prefill, batched.

The logits of a prefill row at position p predict the token at p + 1. For a request that asked, the
step's logit rows get every prompt row of its chunk before the sampled ones, so one forward gives
them all. A chunk's last row predicts the first token of the next chunk, which this rank sees only
in the next step: its log-softmax row waits in `carry` until then. The first prompt token has no
logprob (OpenAI returns null).
"""

from dataclasses import dataclass

import torch

from lightvlm.io_struct import StepInput, TokenLogprob


@dataclass
class PromptChunk:
    req_id: int
    start: int  # position of the chunk's first token
    num_rows: int  # logit rows of this chunk (positions start .. start + num_rows - 1)
    targets: list[int | None]  # the token each row predicts (None: in the next chunk)
    first_input: int  # the chunk's first token (predicted by the previous chunk's carry)
    top: int  # alternatives per token
    carries: bool  # the prompt goes on in the next chunk: the last row predicts its first token


def plan(step: StepInput, reqs: dict, vocab_size: int) -> tuple[list[PromptChunk], list[int]]:
    """The chunks of this step that want prompt logprobs, and their logit rows (step row indices)."""
    chunks, rows, row = [], [], 0
    for req_id, n in zip(step.req_ids, step.num_new_tokens):
        req = reqs[req_id]
        top = req.init.sampling.prompt_logprobs
        start, num_prompt = req.num_computed_tokens, req.init.num_prompt_tokens
        end = min(start + n, num_prompt)
        if top is not None and start < num_prompt:
            # the row of the last prompt token predicts the first output: that is the sampled row
            carries = end < num_prompt
            positions = range(start, end if carries else end - 1)
            ids = step.input_ids[row:row + n]
            targets = [(ids[p + 1 - start] if ids[p + 1 - start] < vocab_size else None) if p + 1 < start + n
                       else None for p in positions]
            chunks.append(PromptChunk(req_id, start, len(positions), targets, ids[0], top, carries))
            rows.extend(row + p - start for p in positions)
        row += n
    return chunks, rows


def token_logprobs(logprobs: torch.Tensor, targets: list[int | None], top: int) -> list[TokenLogprob | None]:
    """logprobs [R, V] (log-softmax rows) and the token each row predicts -> one TokenLogprob per row."""
    known = [i for i, t in enumerate(targets) if t is not None]
    out: list[TokenLogprob | None] = [None] * len(targets)
    if not known:
        return out
    index = torch.tensor(known, device=logprobs.device)
    ids = torch.tensor([targets[i] for i in known], device=logprobs.device)
    chosen = logprobs[index].gather(1, ids[:, None]).squeeze(1).tolist()
    best = torch.topk(logprobs[index], top, dim=-1) if top else None
    for j, i in enumerate(known):
        alternatives = tuple(zip(best.indices[j].tolist(), best.values[j].tolist())) if best is not None else ()
        out[i] = TokenLogprob(targets[i], chosen[j], alternatives)
    return out


def compute(chunks: list[PromptChunk], logits: torch.Tensor, reqs: dict, vocab_size: int) -> tuple:
    """logits of the chunks' rows, in plan order -> ((req id, first position, logprobs), ...). Each
    request's `prompt_carry` holds the last row of a chunk that ends before its prompt does."""
    results, offset = [], 0
    for chunk in chunks:
        req = reqs[chunk.req_id]
        logprobs = logits[offset:offset + chunk.num_rows].log_softmax(dim=-1)
        offset += chunk.num_rows
        values = token_logprobs(logprobs, chunk.targets, chunk.top)
        first = chunk.start + 1
        if chunk.start > 0 and req.prompt_carry is not None:
            target = chunk.first_input if chunk.first_input < vocab_size else None
            values = token_logprobs(req.prompt_carry[None], [target], chunk.top) + values
            first = chunk.start
        req.prompt_carry = None
        if chunk.carries:
            req.prompt_carry = logprobs[-1]
            values = values[:-1]
        results.append((chunk.req_id, first, tuple(values)))
    return tuple(results)
