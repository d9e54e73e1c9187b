"""CUDA graphs for decode steps: the model's forward captured once per batch size, replayed per step.

A decode-only step of B requests (one token each, no image rows, every row sampled) launches some
ten kernels per layer from Python; on a GPU that launch time, not the math, bounds a small batch.
At start-up `DecodeGraphs` captures the forward at the sizes in `graph_batch_sizes(max_batch_size)`
(1, 2, 4, 8, then every 8: vLLM's ladder), largest first, sharing one memory pool. A step then copies
its inputs into the static buffers the graphs read, pads the batch to the next captured size and
replays; the padding rows write their K/V to one spare slot past the pool and attend only to it.

What a graph reads must sit at the same address on every replay, so the buffers are allocated once
at the largest size and each graph sees their first b rows: token ids [b], positions [b] (or [3, b]
for M-RoPE), KV write slots [b], context lengths [b] and the slot table [b, max_len] (the decode
kernel loops up to each row's length, so the width costs nothing). The logits come out of the
graph's own output tensor; `forward` returns a copy of the step's rows.

Where CUDA graphs cannot capture (the CPU), `capture=False` runs the same padded static-buffer step
eagerly: the tests prove the padding and the buffers that way, `make gpu-check` the captured graphs.
"""

from collections.abc import Callable

import torch

from lightvlm.engine.infer_state import InferState, KVCache


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, 8, 16, 24, ... up to max_batch_size (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch_size] + list(range(8, max_batch_size, 8))
    return sorted({*sizes, max_batch_size})


class DecodeGraphs:
    def __init__(self, model: Callable[[InferState], torch.Tensor], kv: KVCache, slot_table: torch.Tensor,
                 max_batch_size: int, position_dims: int, pad_slot: int, capture: bool):
        device = slot_table.device
        self.model, self.kv, self.slot_table, self.pad_slot = model, kv, slot_table, pad_slot
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_batch_size = max_batch_size
        n, max_len = max_batch_size, slot_table.shape[1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros((n,) if position_dims == 1 else (position_dims, n), dtype=torch.long,
                                     device=device)
        self.out_slots = torch.full((n,), pad_slot, dtype=torch.long, device=device)
        self.lengths = torch.ones(n, dtype=torch.long, device=device)
        self.context_slots = torch.full((n, max_len), pad_slot, dtype=torch.long, device=device)
        self.logit_rows = torch.arange(n, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def state(self, b: int) -> InferState:
        """The InferState of a padded batch of b: views of the static buffers."""
        return InferState(input_ids=self.input_ids[:b], positions=self.positions[..., :b],
                          out_slots=self.out_slots[:b], kv=self.kv, slot_table=self.slot_table,
                          logit_rows=self.logit_rows[:b], decode_rows=slice(0, b),
                          decode_slots=self.context_slots[:b], decode_lengths=self.lengths[:b])

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):  # the largest first: the smaller ones fit in its pool
            state = self.state(b)
            side = torch.cuda.Stream()  # warm up (Triton compiles, cuBLAS picks) off the capture stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(state)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model(state)
            self.graphs[b] = (graph, logits)
        torch.cuda.synchronize()

    def fits(self, state: InferState) -> bool:
        """A decode-only step, no images, every row sampled, within the captured sizes."""
        num_rows = state.input_ids.shape[0]
        return (state.prefill is None and state.image_rows is None and isinstance(state.decode_rows, slice)
                and num_rows <= self.max_batch_size and state.logit_rows.shape[0] == num_rows)

    def forward(self, state: InferState) -> torch.Tensor:
        """The step's logits [B, vocab] (fp32), from the graph of the smallest captured size >= B."""
        num_rows = state.input_ids.shape[0]
        b = next(size for size in self.sizes if size >= num_rows)
        self.input_ids[:num_rows].copy_(state.input_ids)
        self.positions[..., :num_rows].copy_(state.positions)
        self.out_slots[:num_rows].copy_(state.out_slots)
        self.lengths[:num_rows].copy_(state.decode_lengths)
        self.context_slots[:num_rows, :state.decode_slots.shape[1]].copy_(state.decode_slots)
        # padding rows: token 0 at position 0, written to and attending only the spare slot
        self.input_ids[num_rows:b].zero_()
        self.positions[..., num_rows:b].zero_()
        self.out_slots[num_rows:b].fill_(self.pad_slot)
        self.lengths[num_rows:b].fill_(1)
        self.context_slots[num_rows:b, 0].fill_(self.pad_slot)
        if b in self.graphs:
            graph, logits = self.graphs[b]
            graph.replay()
        else:  # not captured (the CPU): the same padded step, eagerly
            logits = self.model(self.state(b))
        return logits[:num_rows].clone()
