"""Structured outputs: an output constraint (kind, value) -> an llguidance grammar, checked and compiled
once per grammar.

llguidance, not xgrammar (measured on the CPU, docs/protocol.md): at a 151k vocabulary it fills the
JSON token mask 2-3x faster, compiles a schema in about 1 ms instead of 18-52 ms (a per-request
schema's compile sits on its time to first token), masks special tokens inside JSON strings, and
refuses schema keywords it cannot enforce with a clear message instead of ignoring them.

The httpserver compiles every constraint before it submits the request, so that a bad one is a 400
naming the problem; the worker rank that samples compiles it again for its matchers. Both keep an
LRU of compiled prototypes and hand each request a `deep_copy` (tens of microseconds, and the
prototype's lazily built lexer is shared).
"""

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance as llg

# json.dumps' separators and no free whitespace: a weak model cannot loop on "\n\n\n" inside a JSON
# document (llguidance's default whitespace is unbounded).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


class GrammarError(ValueError):
    """A constraint that cannot be compiled; the message names the problem (answered with 400)."""


def ascii_regex(regex: str) -> str:
    r"""`\d` and `\w` with ASCII meaning, as in JSON Schema patterns and Python's re with re.ASCII:
    llguidance's regexes are Rust's, where they match Unicode digits and letters."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt in "dw":
                body = "0-9" if nxt == "d" else "A-Za-z0-9_"
                out.append(body if in_class else f"[{body}]")
            else:
                out.append(regex[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            if regex[i + 1:i + 2] == "^":  # a "]" right after "[" or "[^" is a literal
                out.append("^")
                i += 1
            if regex[i + 1:i + 2] == "]":
                out.append("]")
                i += 1
        elif c == "]" and in_class:
            in_class = False
            out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def grammar_text(kind: str, value: str) -> str:
    """llguidance's grammar for a constraint (see sampling_params.Constraint). Raises GrammarError."""
    try:
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(value, overrides=JSON_OPTIONS)
        if kind == "regex":
            return llg.grammar_from("regex", ascii_regex(value))
        if kind == "choice":
            choices = json.loads(value)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise GrammarError("choice needs a non-empty list of strings")
            return llg.grammar_from("choice", value)
        if kind == "grammar":  # Lark, or GBNF (converted to Lark)
            return llg.grammar_from("grammar", value)
    except GrammarError:
        raise
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid {kind}: {e}") from None
    raise GrammarError(f"unknown constraint kind {kind!r}")


def make_tokenizer(hf_tokenizer, vocab_size: int, eos_token_ids) -> "llg.LLTokenizer":
    """llguidance's view of the vocabulary: the model's logits width (at least the tokenizer's size) and
    every EOS id the grammar may end on. About 10 ms at 700 ids, 1.5-2 s at 151k."""
    import llguidance.hf

    n_vocab = max(vocab_size, len(hf_tokenizer))
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=list(eos_token_ids))


class GrammarCompiler:
    """Compiles constraints for one tokenizer and caches the results. The tokenizer view is built in
    a background thread at construction, so that neither start-up nor the first request waits for all
    of it (a constrained request before it is ready waits for the rest)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids, capacity: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self.capacity = capacity
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-tokenizer")
        self._tokenizer: Future = pool.submit(make_tokenizer, hf_tokenizer, vocab_size, eos_token_ids)
        pool.shutdown(wait=False)
        self._prototypes: OrderedDict[tuple[str, str], llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # the httpserver compiles from a thread pool

    @property
    def tokenizer(self) -> "llg.LLTokenizer":
        return self._tokenizer.result()

    @property
    def mask_width(self) -> int:
        """int32 words of one token mask (32 ids each)."""
        return (self.tokenizer.vocab_size + 31) // 32

    def check(self, kind: str, value: str) -> None:
        """Compile (or find) the constraint; GrammarError with llguidance's message if it is bad."""
        self._prototype(kind, value)

    def matcher(self, kind: str, value: str) -> "llg.LLMatcher":
        """A fresh matcher for one request."""
        return self._prototype(kind, value).deep_copy()

    def _prototype(self, kind: str, value: str) -> "llg.LLMatcher":
        key = (kind, value)
        with self._lock:
            if key in self._prototypes:
                self._prototypes.move_to_end(key)
                return self._prototypes[key]
        text = grammar_text(kind, value)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        if is_error:
            raise GrammarError(f"invalid {kind}: {messages[0].strip()}")
        prototype = llg.LLMatcher(self.tokenizer, text, log_level=0)
        if prototype.is_error():
            raise GrammarError(f"invalid {kind}: {prototype.get_error().strip()}")
        with self._lock:
            self._prototypes[key] = prototype
            while len(self._prototypes) > self.capacity:
                self._prototypes.popitem(last=False)
        return prototype
