"""How one request wants its tokens chosen and when it wants to stop. Pure data, no torch.

The same object serves the offline pipeline (`GenerationConfig` converts into it), the native API
and the OpenAI API; each face maps its field names onto it in one place. `validate()` raises
ValueError with a message a user can act on.
"""

import math
from dataclasses import dataclass, field, replace

MAX_INT32 = 2**31 - 1
MAX_CHOICES = 16  # n / best_of
# Fields a request may leave unset (None) to get the checkpoint's generation_config.json value.
MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's and vLLM's limit)
MAX_LOGIT_BIAS = 100.0  # OpenAI: each bias lies in [-100, 100]
# Bounds on what one request may ask for, so that no request costs the server much more than others
MAX_STOP_SEQUENCES = 64
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS_ENTRIES = 1024
SEED_RANGE = 2**64  # torch.Generator.manual_seed takes [0, 2**64); for_choice wraps within it
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What the output must match (structured outputs), as text: `value` is the JSON schema (JSON
    text) for json_schema, "" for json_object (any JSON object), a regular expression, the choices
    as a JSON list of strings, or a Lark / GBNF grammar. common/grammar.py turns it into a grammar."""

    kind: str
    value: str = ""


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
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens too, with this many alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] = field(default_factory=list)  # never generated (each word as its tokens)
    constraint: Constraint | None = None  # the output matches this grammar; it ends when the grammar does

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Ranges and types; with `vocab_size`, token ids (logit_bias, allowed_token_ids) are checked too."""
        for name in FLOAT_FIELDS:
            # inf passes the one-sided range checks below (NaN fails them all)
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
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
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < SEED_RANGE),
             f"seed must be an integer in [0, 2**64), got {self.seed!r}"),
            (len(self.stop_sequences) <= MAX_STOP_SEQUENCES,
             f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop_sequences)}"),
            (all(isinstance(s, str) and s for s in self.stop_sequences),
             "stop sequences must be non-empty strings"),
            (all(not isinstance(s, str) or len(s) <= MAX_STOP_LENGTH for s in self.stop_sequences),
             f"each stop sequence must be at most {MAX_STOP_LENGTH} characters"),
            (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
             f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs!r}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                              and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}"),
            (len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
             f"logit_bias may have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}"),
            (all(isinstance(t, int) and t >= 0 for t in self.logit_bias)
             and all(isinstance(b, (int, float)) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                     for b in self.logit_bias.values()),
             f"logit_bias maps token ids (integers >= 0) to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
            (self.allowed_token_ids is None or (bool(self.allowed_token_ids) and all(
                isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
             "allowed_token_ids must be a non-empty list of token ids (integers >= 0)"),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words must be non-empty strings"),
            (self.constraint is None or (self.constraint.kind in CONSTRAINT_KINDS
                                         and isinstance(self.constraint.value, str)),
             f"the output constraint must be one of {', '.join(CONSTRAINT_KINDS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if vocab_size is not None:
            for name, ids in (("logit_bias", self.logit_bias), ("allowed_token_ids", self.allowed_token_ids or ())):
                outside = sorted(t for t in ids if t >= vocab_size)
                if outside:
                    raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {outside[:5]}")
        return self

    @classmethod
    def build(cls, defaults: dict, **fields) -> "SamplingParams":
        """Fields in MODEL_DEFAULTED that are None take `defaults` (models.processor.generation_defaults)."""
        for name in MODEL_DEFAULTED:
            if fields.get(name) is None:
                fields[name] = defaults[name]
        return cls(**fields)

    def for_choice(self, index: int) -> "SamplingParams":
        """Choice `index` of n: its own seed (seed + index, wrapped into the seed range), so that
        sampled choices differ and a seed near 2**64 stays one torch.Generator accepts."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=(self.seed + index) % SEED_RANGE)

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    @property
    def has_logit_rules(self) -> bool:
        """Anything that masks or shifts logits per request (beyond penalties and min_new_tokens)."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words or self.constraint)

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
