"""Loads Hugging Face safetensors checkpoints (single file or sharded) into our modules.

Each checkpoint tensor is renamed by the family (`rename`), routed to one of the modules being loaded
(a process may load only the visual half or only the language half), folded into fused parameters
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) and copied by the parameter's own `weight_loader`, which
takes this rank's slice. Shards are read by `load_workers` threads (env `LOADWORKER`).
"""

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

# (fused parameter, checkpoint name, shard id)
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)

Rename = Callable[[str], "tuple[str, str] | None"]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says what is wrong with it."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in the folder: {', '.join(missing)}")
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {model_dir} (expected model.safetensors or "
                              "model.safetensors.index.json with its shards)")
    return files


def checkpoint_tensor_names(model_dir: str | Path) -> list[str]:
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    names = []
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            names.extend(f.keys())
    return names


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype of the first floating tensor in the checkpoint."""
    with safe_open(checkpoint_files(model_dir)[0], framework="pt") as f:
        for name in f.keys():
            dtype = f.get_slice(name).get_dtype()
            if dtype in ("F32", "BF16", "F16"):
                return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    return torch.float32


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
                    filled.setdefault(id(param), set()).add(shard_id)

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


def build_part(part: str, constructor, model_dir: str | Path, rename: Rename, dtype: torch.dtype, device: str,
               load_workers: int = 1, show_progress: bool = True) -> nn.Module:
    """Build one half of a model ("visual" or "language") in `dtype` on `device` and load its weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = constructor()
    finally:
        torch.set_default_dtype(previous)
    load_weights({part: module}, model_dir, rename, load_workers, show_progress)
    return module.eval()


def resolve_dtype(data_type: str | None, device: str, model_dir: str | Path) -> torch.dtype:
    """--data_type, or by default fp32 on the CPU and the checkpoint's own dtype on CUDA."""
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if data_type is None or data_type == "auto":
        return checkpoint_dtype(model_dir) if device.startswith("cuda") else torch.float32
    if data_type not in names:
        raise ValueError(f"unknown data type {data_type!r}; use one of fp32, bf16, fp16")
    return names[data_type]
