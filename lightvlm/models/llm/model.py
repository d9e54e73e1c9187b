"""A text-only language model: the shared decoder and its LM head, nothing to splice in."""

from lightvlm.common.distributed import SINGLE, TPGroup
from lightvlm.models.layers.decoder import CausalLM
from lightvlm.models.llm.config import LLMConfig


class LLMLanguage(CausalLM):
    """`model.*` and `lm_head` of a Qwen2ForCausalLM, LlamaForCausalLM or Qwen3ForCausalLM checkpoint."""

    def __init__(self, config: LLMConfig, tp: TPGroup = SINGLE):
        super().__init__(config.text, tp)
