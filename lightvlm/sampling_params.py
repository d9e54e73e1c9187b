"""How one request wants its tokens chosen and when it wants to stop. Pure data, no torch.

The same object serves the offline pipeline (`GenerationConfig` converts into it), the native API
and the OpenAI API. `validate()` raises ValueError with a message a user can act on.
"""

from dataclasses import dataclass, field, replace

MAX_INT32 = 2**31 - 1
MAX_CHOICES = 16  # n / best_of
# Fields a request may leave unset (None) to get the checkpoint's generation_config.json value.
MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    do_sample: bool = False  # False: greedy, whatever the other knobs say
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_sequences: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> "SamplingParams":
        checks = [
            (isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= MAX_INT32,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"),
            (isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0,
             f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and (1 <= self.top_k <= MAX_INT32 or self.top_k in (-1, 0)),
             f"top_k must be -1 (off) or an integer from 1 to {MAX_INT32}, got {self.top_k!r}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
             f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop_sequences),
             "stop sequences must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20,
             f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self

    @classmethod
    def build(cls, defaults: dict, **fields) -> "SamplingParams":
        """Fields in MODEL_DEFAULTED that are None take `defaults` (models.processor.generation_defaults)."""
        for name in MODEL_DEFAULTED:
            if fields.get(name) is None:
                fields[name] = defaults[name]
        return cls(**fields)

    def for_choice(self, index: int) -> "SamplingParams":
        """Choice `index` of n: its own seed (seed + index), so that sampled choices differ."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=self.seed + index)

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
