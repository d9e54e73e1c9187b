"""Loads Hugging Face safetensors checkpoints (single file or sharded) into our modules.

Each checkpoint tensor is renamed by the family (`rename`), routed to one of the modules being loaded
(a process may load only the visual half or only the language half), folded into fused parameters
(q/k/v -> qkv_proj, gate/up -> gate_up_proj; a checkpoint's own fused qkv is unpacked first) and
copied by the parameter's own `weight_loader`, which takes this rank's slice. Shards are read by
`load_workers` threads (env `LOADWORKER`).
"""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from lightvlm.common.logging import get_logger
from lightvlm.models.checkpoint import CheckpointError, LoadedCheckpoint, checkpoint_dtype, checkpoint_files
from lightvlm.models.layers.linear import PACKED_QKV
from lightvlm.models.registry import load_object

logger = get_logger(__name__)

# (fused parameter, checkpoint name, shard id)
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("qkv_proj", "qkv", "qkv_concatenated"),  # q, k, v already fused (InternViT)
    ("qkv_proj", "wqkv", "qkv_grouped"),  # fused per KV head (InternLM2)
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
# a shard id that fills several parts of its parameter at once
PACKED_SHARDS = {packed: {"q", "k", "v"} for packed in PACKED_QKV}

Rename = Callable[[str], "tuple[str, str] | None"]


def _resolve(params: dict[str, nn.Parameter], name: str):
    """Checkpoint-side name (already renamed) -> (parameter, shard id) or None if we have no such param."""
    if name in params:
        return params[name], None
    for fused, part, shard_id in STACKED_PARAMS:
        key = f".{part}."
        if key in name:
            fused_name = name.replace(key, f".{fused}.")
            if fused_name in params:
                return params[fused_name], shard_id
    return None


def load_weights(modules: dict[str, nn.Module], model_dir: str | Path, rename: Rename,
                 load_workers: int = 1, show_progress: bool = True) -> None:
    """Fill every parameter of `modules` (part name -> module) from the checkpoint in `model_dir`.

    Raises CheckpointError naming the first parameter no checkpoint tensor filled.
    """
    params = {part: dict(module.named_parameters()) for part, module in modules.items()}
    filled: dict[int, set] = {}  # id(param) -> shard ids loaded into it
    lock = threading.Lock()

    def load_file(path: Path) -> None:
        with safe_open(path, framework="pt") as f:
            for ckpt_name in f.keys():
                target = rename(ckpt_name)
                if target is None or target[0] not in params:
                    continue
                resolved = _resolve(params[target[0]], target[1])
                if resolved is None:
                    continue  # e.g. vision layers past the selected feature layer, rotary caches
                param, shard_id = resolved
                tensor = f.get_tensor(ckpt_name)
                try:
                    param.weight_loader(param, tensor.to(param.dtype), shard_id)
                except ValueError as e:
                    raise CheckpointError(f"{ckpt_name} in {path.name}: {e}") from None
                with lock:
                    filled.setdefault(id(param), set()).update(PACKED_SHARDS.get(shard_id, {shard_id}))

    files = checkpoint_files(model_dir)
    progress = tqdm(total=len(files), desc="Loading safetensors", unit="shard", disable=not show_progress)
    with torch.no_grad(), progress, ThreadPoolExecutor(max_workers=max(1, load_workers)) as pool:
        for future in [pool.submit(load_file, path) for path in files]:
            future.result()
            progress.update(1)

    for part, named in params.items():
        for name, param in named.items():
            need = getattr(param, "required_shards", {None})
            missing = need - filled.get(id(param), set())
            if missing:
                what = "" if missing == {None} else f" (part {', '.join(sorted(map(str, missing)))})"
                raise CheckpointError(f"checkpoint {model_dir} is missing the tensor for {part}.{name}{what}")


def build_part(ckpt: LoadedCheckpoint, part: str, tp, dtype: torch.dtype, device: str, load_workers: int = 1,
               show_progress: bool = True) -> nn.Module:
    """Build one half of the model ("visual" or "language") in `dtype` on `device` and load its weights."""
    family = ckpt.family
    constructor = load_object(family.visual_class if part == "visual" else family.language_class)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = constructor(ckpt.config, tp)
    finally:
        torch.set_default_dtype(previous)
    load_weights({part: module}, ckpt.model_dir, family.rename, load_workers, show_progress)
    return module.eval()


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# CPU features whose bf16 matmuls beat fp32 (measured in docs/performance.md): AMX tiles (Intel Sapphire
# Rapids and later) and AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def auto_dtype(device: str, model_dir: str | Path, flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """`--data_type auto`: (dtype, why). CUDA runs the checkpoint's own dtype; the CPU runs bf16 where
    it has bf16 matrix instructions and fp32 elsewhere."""
    if device.startswith("cuda"):
        name = checkpoint_dtype(model_dir)
        return SAFETENSORS_DTYPES[name], f"the checkpoint's dtype ({name})"
    found = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if found:
        return torch.bfloat16, f"the CPU has {', '.join(found)}"
    return torch.float32, "the CPU has no bf16 matrix instructions"


def resolve_dtype(data_type: str, device: str, model_dir: str | Path) -> torch.dtype:
    """--data_type; `auto` (the default) as `auto_dtype` decides, logged."""
    if data_type == "auto":
        dtype, why = auto_dtype(device, model_dir)
        logger.info("data type auto: %s, because %s", str(dtype).removeprefix("torch."), why)
        return dtype
    if data_type not in DTYPES:
        raise ValueError(f"unknown data type {data_type!r}; use one of auto, fp32, bf16, fp16")
    return DTYPES[data_type]
