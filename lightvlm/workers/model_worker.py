"""A model worker: one tensor-parallel rank of the language model, behind rpyc (the server's router and the
tp > 1 pipeline both drive it).

The router calls `step(pickled StepInput)` on every rank at once; all ranks run the step (their
all-reduces meet), rank 0 samples and answers with a pickled StepOutput. Image embeddings are read
from the visualserver's shared-memory cache, attached while a request that uses them is alive.
"""

import os
import pickle

import torch

from lightvlm.common import shm
from lightvlm.common.cpu_share import thread_policy, threads_for, working
from lightvlm.common.distributed import init_tp_group, kv_heads_per_rank
from lightvlm.common.errors import StartupError
from lightvlm.common.logging import get_logger
from lightvlm.common.process import run_room
from lightvlm.common.rpc import NoDelayService, serve
from lightvlm.config import ServerConfig
from lightvlm.engine.infer_state import KVCache
from lightvlm.engine.model_runner import ModelRunner, RunnerConfig
from lightvlm.models.checkpoint import LoadedCheckpoint
from lightvlm.models.weight_loader import resolve_dtype

logger = get_logger(__name__)

MIN_PARALLEL_TOKENS = 32  # below this many tokens a step runs faster on one thread than on two
# tests: a request whose prompt starts with this token id makes its step raise once it has two tokens
FAULT_ENV = "LIGHTVLM_FAULT_STEP_TOKEN"


class ShmImageStore:
    """Image key -> embedding rows, read from the embed cache's shared memory while requests hold it."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.segments: dict[str, tuple[object, torch.Tensor, int]] = {}  # key -> (shm, tensor, holders)

    def hold(self, key: str) -> None:
        if key in self.segments:
            segment, tensor, holders = self.segments[key]
            self.segments[key] = (segment, tensor, holders + 1)
            return
        segment = shm.attach(shm.embedding_segment(self.prefix, key))
        self.segments[key] = (segment, shm.read_embeddings(segment.buf), 1)

    def drop(self, key: str) -> None:
        segment, tensor, holders = self.segments[key]
        if holders > 1:
            self.segments[key] = (segment, tensor, holders - 1)
            return
        del self.segments[key]
        del tensor
        segment.close()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.segments[key][1]


CUDA_RESERVE_BYTES = 1 << 30  # activations, decode graphs' pool, the sampler's buffers


def language_weight_bytes(text, dtype: torch.dtype, tp_size: int) -> int:
    """The language model's weights on one rank (the decoder's matrices, the embedding tables and the
    norms; biases left out), counted from the config before they are loaded: an estimate."""
    attention = 2 * text.hidden_size * text.head_dim * (text.num_heads + text.num_kv_heads)
    layer = attention + 3 * text.hidden_size * text.intermediate_size + 2 * text.hidden_size
    tables = text.vocab_size * text.hidden_size * (1 if text.tie_word_embeddings else 2)
    return (text.num_layers * layer + tables) * torch.empty((), dtype=dtype).element_size() // tp_size


def cuda_kv_budget(free: int, total: int, mem_fraction: float, weight_bytes: int) -> float:
    """Bytes for the KV cache: the share of the GPU given to lightvlm (mem_fraction of it, less what is
    used already) less the weights still to load and a reserve."""
    return free - total * (1 - mem_fraction) - weight_bytes - CUDA_RESERVE_BYTES


def plan_kv_slots(config: ServerConfig, max_len: int, bytes_per_token: int, device: torch.device,
                  weight_bytes: int = 0) -> int:
    """KV slots: --max_total_token_num, else what --mem_fraction leaves after the weights (planned
    before they load: `weight_bytes`)."""
    if config.router.max_total_token_num:
        return config.router.max_total_token_num
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = cuda_kv_budget(free, total, config.router.mem_fraction, weight_bytes)
    else:
        budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * config.router.mem_fraction / 4
    ceiling = config.router.running_max_req_size * max_len
    return int(min(max(budget, 0) // bytes_per_token, ceiling))


class ModelWorkerService(NoDelayService):
    def __init__(self, runner: ModelRunner, num_slots: int, cpu_share=None):
        super().__init__()
        self.runner = runner
        self.num_slots = num_slots
        self.cpu_share = cpu_share
        self.fault_token = int(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None
        self.doomed: set[int] = set()  # requests the injected fault will hit
        self.doomed_first_slots: set[int] = set()  # KV slots of doomed prompts' first token (prefix cache)

    def exposed_info(self) -> bytes:
        return pickle.dumps({"num_slots": self.num_slots})

    def exposed_step(self, payload: bytes) -> bytes:
        step = pickle.loads(payload)
        with working(self.cpu_share, parallel=len(step.input_ids) >= MIN_PARALLEL_TOKENS):
            out = self.runner.step(step, self._check_fault)
        return pickle.dumps(out)

    def _check_fault(self, step) -> None:
        """Fails a doomed request's step after it produced two tokens, so that streams see it mid-way."""
        if self.fault_token is None:
            return
        row = 0
        for req_id, n in zip(step.req_ids, step.num_new_tokens):
            req = self.runner.reqs[req_id]
            cached = req.init.cached_slots
            if req.num_computed_tokens == 0 and step.input_ids[row] == self.fault_token:
                self.doomed.add(req_id)
                self.doomed_first_slots.add(step.new_slots[row])
            elif cached and req.num_computed_tokens == len(cached) and cached[0] in self.doomed_first_slots:
                self.doomed.add(req_id)  # its first token came from the prefix cache (test pools never evict)
            if req_id in self.doomed and req.num_computed_tokens > req.init.num_prompt_tokens:  # also retried alone
                raise RuntimeError(f"injected fault: a prompt starting with token {self.fault_token} ({FAULT_ENV})")
            row += n


def start_worker_process(config: ServerConfig, rank: int, pipe) -> None:
    def start():
        device = torch.device(f"cuda:{rank}" if config.model.device == "cuda" else "cpu")
        share = threads_for(config.cpu.llm_threads, config.runtime.cpu_share, rank, config.cpu.cores, device.type)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tp = init_tp_group(rank, config.model.tp, f"tcp://127.0.0.1:{config.runtime.dist_port}", device)
        ckpt = LoadedCheckpoint.open(config.model.model_dir)
        max_len = ckpt.context_limit(config.router.max_req_total_len)
        dtype = resolve_dtype(config.model.data_type, device.type, config.model.model_dir)
        text = ckpt.config.text
        kv_heads = kv_heads_per_rank(text.num_kv_heads, config.model.tp)
        per_token = KVCache.bytes_per_token(text.num_layers, kv_heads, text.head_dim, dtype)
        num_slots = plan_kv_slots(config, max_len, per_token, device,
                                  language_weight_bytes(text, dtype, config.model.tp))
        if tp.size > 1:  # every rank must agree on the pool size (on the device: NCCL has no CPU tensors)
            agreed = torch.tensor([num_slots], device=device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            num_slots = int(agreed)
        if num_slots < max_len:
            raise StartupError(f"the KV cache fits {num_slots} tokens, less than one request of --max_req_total_len "
                               f"{max_len}: one full-length request would never fit; raise --mem_fraction or "
                               "--max_total_token_num, or lower --max_req_total_len")
        runner_config = RunnerConfig(num_slots=num_slots, max_reqs=config.router.running_max_req_size,
                                     max_len=max_len, dtype=dtype, device=str(device),
                                     load_workers=config.model.load_workers,
                                     graph_max_batch_size=config.model.graph_max_batch_size)
        store = ShmImageStore(config.runtime.shm_prefix)
        runner = ModelRunner(ckpt, runner_config, store, tp=tp, show_progress=rank == 0)
        logger.info("rank %d/%d ready: %d KV slots, %s on %s, %s", rank, tp.size, num_slots, dtype, device,
                    thread_policy(share))
        service = ModelWorkerService(runner, num_slots, share)
        return lambda: serve(service, config.runtime.worker_ports[rank])

    run_room(f"worker{rank}", pipe, config.log_level, start)

