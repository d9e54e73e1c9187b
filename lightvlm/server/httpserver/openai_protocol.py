"""The OpenAI request bodies, validated as vLLM validates them, and their one mapping onto SamplingParams.

Every field is either acted on, rejected with a 400 when set to something lightvlm cannot do
(`UNSUPPORTED`), or ignored because vLLM ignores it too and it cannot change the output (`IGNORED`);
docs/protocol.md has the table. Fields nobody knows are ignored for compatibility (clients send
extras) and logged once per name. Types and ranges are checked with messages naming the field.
"""

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lightvlm.common.logging import get_logger
from lightvlm.sampling_params import MAX_CHOICES, MAX_INT32, MAX_LOGPROBS, Constraint, SamplingParams
from lightvlm.server.httpserver.manager import ClientError
from lightvlm.server.httpserver.structured import guided_constraints, pick_one, schema_text

logger = get_logger(__name__)
LENIENT = ConfigDict(extra="allow", populate_by_name=True)


def unset(value) -> bool:
    return value is None


def off(value) -> bool:
    return value in (None, False)


# field -> (what a value must satisfy to be a no-op here, what to tell the client)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "audio": (unset, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "functions": (unset, "the deprecated `functions` are not supported; send `tools`"),
    "function_call": (unset, "the deprecated `function_call` is not supported; send `tool_choice`"),
    "web_search_options": (unset, "web search is not supported"),
    "moderation": (unset, "moderation is not supported"),
    "suffix": (lambda v: v in (None, ""), "suffix is not supported"),
    "use_beam_search": (off, "beam search is not supported"),
    "length_penalty": (lambda v: v in (None, 1, 1.0), "length_penalty (beam search) is not supported"),
    "include_stop_str_in_output": (off, "include_stop_str_in_output is not supported"),
    "spaces_between_special_tokens": (lambda v: v in (None, True), "spaces_between_special_tokens false is "
                                                                    "not supported"),
    "truncate_prompt_tokens": (unset, "truncate_prompt_tokens is not supported"),
    "continue_final_message": (off, "continue_final_message is not supported"),
    "chat_template": (unset, "a request's own chat_template is not supported"),
    "mm_processor_kwargs": (lambda v: not v, "mm_processor_kwargs set image bounds; /v1/completions takes no "
                                             "images (chat takes them)"),
    "logits_processors": (lambda v: not v, "logits_processors are not supported"),
    "return_tokens_as_token_ids": (off, "return_tokens_as_token_ids is not supported"),
    "guided_whitespace_pattern": (unset, "guided_whitespace_pattern is not supported (JSON is written with "
                                         "single spaces after ',' and ':')"),
    "structural_tag": (unset, "structural_tag is not supported"),
    "guided_decoding_backend": (lambda v: v in (None, "auto", "guidance", "llguidance"),
                                "the structured-output backend is llguidance"),
    "priority": (lambda v: v in (None, 0), "request priorities are not supported"),
    "kv_transfer_params": (unset, "KV transfer is not supported"),
    "vllm_xargs": (unset, "vllm_xargs are not supported"),
    "cache_salt": (unset, "cache_salt is not supported"),
}
# Accepted and not acted on, as in vLLM: identity, storage and caching hints that do not change the output.
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "prompt_cache_options", "prediction", "reasoning_effort", "verbosity",
           "request_id", "include_reasoning")
_logged: set[str] = set()


def check_extras(extras: dict[str, Any]) -> None:
    """Fields outside the model: a 400 for one set to what lightvlm cannot do, a log line (once per
    name) for the rest."""
    for name, value in extras.items():
        if name in UNSUPPORTED:
            is_noop, message = UNSUPPORTED[name]
            if not is_noop(value):
                raise ClientError(f"'{name}': {message}")
            continue
        if name not in _logged:
            _logged.add(name)
            why = "as vLLM does" if name in IGNORED else "unknown field"
            logger.warning("ignoring the request field '%s' (%s); said once per field name", name, why)


class StreamOptions(BaseModel):
    model_config = LENIENT
    include_usage: bool = False
    continuous_usage_stats: bool = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def check_continuous(cls, value: bool) -> bool:
        if value:
            raise ValueError("continuous_usage_stats is not supported")
        return value


class JsonSchemaFormat(BaseModel):
    model_config = LENIENT
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = LENIENT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's newer spelling of the guided_* fields."""

    model_config = LENIENT
    json_schema: Any = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(BaseModel):
    """What both completion endpoints accept besides the prompt."""

    model_config = LENIENT
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None  # None: the checkpoint's generation_config.json, else 1
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("n")
    @classmethod
    def check_n(cls, n: int) -> int:
        if not 1 <= n <= MAX_CHOICES:
            raise ValueError(f"n must be between 1 and {MAX_CHOICES}")
        return n

    def check(self, served_model: str) -> None:
        """What spans fields: the model's name (404), stream_options, and the unknown extras."""
        if self.model is not None and self.model != served_model:
            raise ModelNotFound(f"The model `{self.model}` does not exist.")
        if self.stream_options is not None and not self.stream:
            raise ClientError("Stream options can only be defined when `stream=True`.")
        check_extras(self.model_extra or {})

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def constraint(self, extra: dict[str, Constraint | None] | None = None) -> Constraint | None:
        """The output constraint, from whichever field names it (at most one)."""
        candidates = dict(extra or {})
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            candidates["response_format"] = Constraint("json_object")
        elif fmt is not None and fmt.type == "json_schema":
            spec = fmt.json_schema
            if spec is None or spec.json_schema is None:
                raise ClientError("'response_format': type json_schema needs json_schema.schema")
            candidates["response_format"] = Constraint("json_schema", schema_text(
                spec.json_schema, "response_format.json_schema.schema", strict=bool(spec.strict)))
        candidates.update(guided_constraints("guided_", self.guided_json, self.guided_regex, self.guided_choice,
                                             self.guided_grammar))
        if (so := self.structured_outputs) is not None:
            candidates.update(guided_constraints("structured_outputs.", so.json_schema, so.regex, so.choice,
                                                 so.grammar))
            if so.json_object:
                candidates["structured_outputs.json_object"] = Constraint("json_object")
        return pick_one(candidates)

    def sampling_params(self, logprobs: bool, top_logprobs: int, defaults: dict,
                        constraint: Constraint | None = None, prompt_logprobs: int | None = None,
                        skip_special_tokens: bool | None = None) -> SamplingParams:
        """The one mapping of OpenAI's and vLLM's field names onto SamplingParams."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        explicit = self.max_new_tokens()
        temperature = defaults["temperature"] if self.temperature is None else self.temperature
        params = SamplingParams.build(  # without max_tokens, check_length gives the rest of the context
            defaults, max_new_tokens=explicit if explicit is not None else MAX_INT32, min_new_tokens=self.min_tokens,
            do_sample=temperature > 0, temperature=temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, ignore_eos=self.ignore_eos,
            stop_sequences=stop, stop_token_ids=list(self.stop_token_ids),
            skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
            logprobs=logprobs, top_logprobs=top_logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            logit_bias=dict(self.logit_bias or {}), allowed_token_ids=self.allowed_token_ids,
            bad_words=list(self.bad_words), constraint=constraint)
        try:
            return params.validate()
        except ValueError as e:
            message = str(e).replace("max_new_tokens", "max_tokens").replace("min_new_tokens", "min_tokens")
            raise ClientError(message) from None


class ModelNotFound(ClientError):
    """Answered with 404 (vLLM's message)."""

    status = 404


class FunctionDefinition(BaseModel):
    model_config = LENIENT
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = LENIENT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = LENIENT
    name: str


class NamedToolChoice(BaseModel):
    model_config = LENIENT
    type: Literal["function"]
    function: NamedFunction


class ProcessorKwargs(BaseModel):
    """`mm_processor_kwargs` (as vLLM names them): the resolution bounds of this request's images."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt bound must not pass unnoticed
    min_pixels: int | None = None
    max_pixels: int | None = None


def check_messages(messages: list[dict[str, Any]], field: str = "messages") -> None:
    """What the chat template cannot be trusted to refuse: no messages, and text that is not a string
    (a number would be rendered by the template). Each message names its field path."""
    if not messages:
        raise ClientError(f"{field} must not be empty")
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ClientError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ClientError(f"{where}.role must be a string")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ClientError(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ClientError(f"{where}.content[{j}] must be an object with a 'type', got {type(part).__name__}")
            if part.get("type") == "text" and not isinstance(part.get("text"), str):
                raise ClientError(f"{where}.content[{j}].text must be a string, got {type(part.get('text')).__name__}")


class ChatRequest(SamplingFields):
    messages: list[dict[str, Any]]
    mm_processor_kwargs: ProcessorKwargs | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def check_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported on chat completions; use /v1/completions")
        return echo

    def check(self, served_model: str) -> None:
        super().check(served_model)
        check_messages(self.messages)

    def forced_functions(self) -> list[FunctionDefinition] | None:
        """The functions a call must be made to (`required`: any of them; a named one: that one), or None."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none", "auto"):
                raise ClientError("'tool_choice' needs 'tools'")
            return None
        if choice == "required":
            return [tool.function for tool in self.tools]
        if isinstance(choice, NamedToolChoice):
            named = [tool.function for tool in self.tools if tool.function.name == choice.function.name]
            if not named:
                raise ClientError(f"'tool_choice' names the function {choice.function.name!r}, which is not in 'tools'")
            return named
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None

    def check(self, served_model: str) -> None:
        super().check(served_model)
        if self.best_of is not None and self.best_of != self.n:
            raise ClientError(f"'best_of' other than n is not supported (got best_of={self.best_of}, n={self.n})")
        if self.max_tokens == 0 and not self.echo:
            raise ClientError("max_tokens must be >= 1 (0 only with echo, to score the prompt)")
