"""Model families, found by the checkpoint's `architectures[0]`.

A family says how to read its config, which module is its visual half and which its language half,
which processor prepares its prompts, and how checkpoint tensor names map onto its modules.
Adding a family means adding one entry here (see docs/models.md).
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from lightvlm.models.processor import load_processor
from lightvlm.models.weight_loader import CheckpointError, checkpoint_tensor_names


@dataclass(frozen=True)
class ModelFamily:
    name: str
    parse_config: Callable[[dict], object]  # HF config.json -> our frozen config
    visual_module: Callable  # (config, tp) -> nn.Module: pixel tiles -> image embeddings
    language_module: Callable  # (config, tp) -> CausalLM
    processor_class: str  # "module:Class" with from_model_dir(), imported where needed (the httpserver)
    rename: Callable[[str], "tuple[str, str] | None"]  # checkpoint name -> ("visual"|"language", our name)


def _internvl_rename(name: str) -> tuple[str, str] | None:
    """Both checkpoint layouts: transformers >= 4.52 (`model.language_model.*`, `lm_head.*`) and older
    (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*` at top level)."""
    name = name.removeprefix("model.")
    if name.startswith("language_model.model."):
        return "language", "language_model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model.lm_head."):
        return "language", name.removeprefix("language_model.")
    if name.startswith(("language_model.", "lm_head.")):
        return "language", name
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "visual", name
    return None


def _internvl() -> ModelFamily:
    from lightvlm.models.internvl.config import InternVLConfig
    from lightvlm.models.internvl.model import InternVLLanguage, InternVLVisual

    return ModelFamily(
        name="internvl",
        parse_config=InternVLConfig.from_hf,
        visual_module=InternVLVisual,
        language_module=InternVLLanguage,
        processor_class="lightvlm.models.internvl.processor:InternVLProcessor",
        rename=_internvl_rename,
    )


# architectures[0] -> family factory (imported lazily so that reading the registry costs nothing)
ARCHITECTURES: dict[str, Callable[[], ModelFamily]] = {
    "InternVLForConditionalGeneration": _internvl,
}


def read_hf_config(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir} has no config.json; is it a Hugging Face checkpoint folder?")
    return json.loads(path.read_text())


def get_family(hf_config: dict) -> ModelFamily:
    architectures = hf_config.get("architectures") or []
    name = architectures[0] if architectures else None
    if name not in ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]()


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint folder read once: its family and its parsed config."""

    model_dir: Path
    family: ModelFamily
    config: object
    hf_config: dict

    @classmethod
    def open(cls, model_dir: str | Path) -> "LoadedCheckpoint":
        hf = read_hf_config(model_dir)
        family = get_family(hf)
        config = family.parse_config(hf)
        # The LM head is tied to the embedding exactly when the checkpoint has no head of its own: that
        # is what transformers ends up doing whatever the (often missing) tie_word_embeddings says.
        has_head = any(family.rename(name) == ("language", "lm_head.weight")
                       for name in checkpoint_tensor_names(model_dir))
        config = replace(config, text=replace(config.text, tie_word_embeddings=not has_head))
        return cls(Path(model_dir), family, config, hf)

    def make_processor(self):
        return load_processor(self.family.processor_class, self.model_dir)

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """generation_config.json's EOS ids (what transformers' generate stops on), else config.json's."""
        path = self.model_dir / "generation_config.json"
        eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        if eos is None:
            eos = self.hf_config.get("eos_token_id", self.hf_config.get("text_config", {}).get("eos_token_id"))
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (eos,)
