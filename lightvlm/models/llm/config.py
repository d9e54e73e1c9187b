"""A text-only language model's configuration: its `config.json` is the text config itself."""

from dataclasses import dataclass

from lightvlm.models.text_config import TextConfig


@dataclass(frozen=True)
class LLMConfig:
    text: TextConfig

    @classmethod
    def from_hf(cls, hf: dict) -> "LLMConfig":
        return cls(text=TextConfig.from_hf(hf))
