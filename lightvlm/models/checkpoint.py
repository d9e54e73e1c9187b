"""A checkpoint folder read once: `LoadedCheckpoint.open` is the one validation every room and the
pipeline run, and the one source of the facts derived from the folder (family, parsed config,
processor, EOS ids, tied head, context limit).

No torch here: the httpserver opens checkpoints too. Tensor names and dtypes come from the
safetensors headers (8 bytes of length, then JSON).
"""

import json
import os
import struct
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from lightvlm.common.errors import StartupError
from lightvlm.models.registry import ModelFamily, get_family, load_object


class CheckpointError(StartupError):
    """A checkpoint folder that cannot be served; the message says what is wrong and where it looked."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index)["weight_map"].values()))
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


def safetensors_header(path: Path) -> dict:
    """Tensor name -> {"dtype", "shape", ...} of one safetensors file, read without loading it."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > os.path.getsize(path):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(model_dir: str | Path) -> dict[str, dict]:
    """Every tensor of the checkpoint: name -> {"dtype", "shape"}."""
    tensors = {}
    for path in checkpoint_files(model_dir):
        tensors.update(safetensors_header(path))
    return tensors


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The safetensors dtype ("F32", "BF16", "F16") of the checkpoint's floating tensors."""
    return next((t["dtype"] for t in checkpoint_tensors(model_dir).values() if t["dtype"] in ("F32", "BF16", "F16")),
                "F32")


@dataclass(frozen=True)
class LoadedCheckpoint:
    model_dir: Path
    family: ModelFamily
    config: object  # the family's config: `.text` (TextConfig) and, for VLMs, its vision settings
    hf_config: dict

    @classmethod
    def open(cls, model_dir: str | Path) -> "LoadedCheckpoint":
        """Read and check the folder. Raises CheckpointError with a message naming what is wrong."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"model folder {model_dir} does not exist")
        if not (model_dir / "config.json").exists():
            raise CheckpointError(f"{model_dir} has no config.json; is it a Hugging Face checkpoint folder?")
        hf = read_json(model_dir / "config.json")
        try:
            family = get_family(hf)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        try:
            config = family.parse_config(hf)
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            raise CheckpointError(f"{model_dir / 'config.json'}: {detail}") from None
        # The LM head is tied to the embedding exactly when the checkpoint has no head of its own: that
        # is what transformers ends up doing whatever the (often missing) tie_word_embeddings says.
        has_head = any(family.rename(name) == ("language", "lm_head.weight") for name in checkpoint_tensors(model_dir))
        config = replace(config, text=replace(config.text, tie_word_embeddings=not has_head))
        processor = cls._build_processor(model_dir, family, config)  # building it checks it against the model
        if getattr(config, "image_token_id", 0) is None:  # the original InternVL layout names it only in the tokenizer
            config = replace(config, image_token_id=processor.image_token_id)
        ckpt = cls(model_dir, family, config, hf)
        ckpt.__dict__["processor"] = processor  # the cached_property's slot
        if not ckpt.eos_token_ids:
            raise CheckpointError(f"{model_dir} names no EOS token: none in generation_config.json, config.json "
                                  "or the tokenizer's eos_token; generation would never stop")
        return ckpt

    @property
    def is_multimodal(self) -> bool:
        return self.family.visual_class is not None

    @cached_property
    def processor(self):
        """The family's processor; building it checks it against the model (tile size, tokens per tile, ...)."""
        return self._build_processor(self.model_dir, self.family, self.config)

    @staticmethod
    def _build_processor(model_dir: Path, family: ModelFamily, config):
        try:
            return load_object(family.processor_class)(model_dir, config)
        except StartupError:
            raise
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{model_dir}: cannot build the processor: {e}") from None

    def make_processor(self):
        """A processor of its own (each shell's thread or room may own one)."""
        return load_object(self.family.processor_class)(self.model_dir, self.config)

    @property
    def embedding_width(self) -> int:
        """Width of one image-embedding row (the language model's hidden size, wider for families that
        carry extra features per row)."""
        return getattr(self.config, "embedding_width", self.config.text.hidden_size)

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Where transformers' generate() stops: generation_config.json's eos_token_id, else the language
        config's (config.json, its text_config or llm_config), else the tokenizer's eos_token."""
        eos = read_json(self.model_dir / "generation_config.json").get("eos_token_id")
        hf = self.hf_config
        for section in (hf, hf.get("text_config") or {}, hf.get("llm_config") or {}):
            if eos is None:
                eos = section.get("eos_token_id")
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (eos,)

    def context_limit(self, requested: int | None) -> int:
        """Tokens one request may hold (prompt + output): `requested` (--max_req_total_len), else the
        model's max_position_embeddings."""
        limit = self.config.text.max_position_embeddings
        if requested is not None and requested > limit:
            raise StartupError(f"--max_req_total_len {requested} exceeds the model's max_position_embeddings ({limit})")
        return requested or limit
