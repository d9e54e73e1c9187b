"""Hypothesis strategies from the JSON schemas of /openapi.json (the subset pydantic emits: $ref, anyOf,
const, enum, type, properties, items, additionalProperties, minimum/maximum, pattern). Half the bodies are
what the schema describes (a few optional fields each, numbers mostly in everyday ranges), half have one
value somewhere replaced by any JSON, so that both the 200s and the 400s are reached."""

from hypothesis import strategies as st

JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20) | \
    st.floats(allow_nan=False, allow_infinity=False)
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) |
                        st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)

# fields whose schema allows values that would only make the test slow: kept small
SMALL_INTS = {"max_new_tokens": (1, 8), "max_tokens": (1, 8), "max_completion_tokens": (1, 8), "n": (1, 3),
              "best_of": (1, 3), "min_new_tokens": (0, 4), "min_tokens": (0, 4), "top_logprobs": (0, 3),
              "logprobs": (0, 3), "prompt_logprobs": (0, 3)}
SLOW_FIELDS = {"guided_regex", "guided_grammar", "guided_json", "regular_constraint", "structured_outputs",
               "response_format", "tools", "tool_choice"}  # grammar compiles are bounded elsewhere, not fuzzed here


TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
IMAGE_PART = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
    {"url": st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "http://127.0.0.1:9/x.png", ""])})})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "bot"]),
                                 "content": st.text(max_size=30) | st.lists(TEXT_PART | IMAGE_PART, max_size=3)})
OVERRIDES = {"messages": st.lists(MESSAGE, min_size=1, max_size=3)}  # the schema says only "objects"
MAX_OPTIONAL = 3


def mutate(value, replacement, choice: int):
    """value with one element, found by walking down with the digits of choice, replaced."""
    children = list(value) if isinstance(value, dict) else range(len(value)) if isinstance(value, list) else []
    if not children or choice % 3 == 0:
        return replacement
    key = children[(choice // 3) % len(children)]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[key] = mutate(value[key], replacement, choice // (3 * len(children)))
    return copy


class SchemaStrategies:
    def __init__(self, components: dict):
        self.components = components

    def body(self, schema: dict) -> st.SearchStrategy:
        exact = self.for_schema(schema)
        broken = st.builds(mutate, exact, ANY_JSON, st.integers(1, 10**6))
        return exact | broken

    def for_schema(self, schema: dict, name: str = "", depth: int = 0) -> st.SearchStrategy:
        return OVERRIDES[name] if name in OVERRIDES else self.exact(schema, name, depth)

    def exact(self, schema: dict, name: str, depth: int) -> st.SearchStrategy:
        if "$ref" in schema:
            return self.exact(self.components[schema["$ref"].rsplit("/", 1)[1]], name, depth)
        if name in SMALL_INTS and depth > 0:  # never null either: a null max_tokens runs to the context limit
            return st.integers(*SMALL_INTS[name])
        if "anyOf" in schema:
            return st.one_of([self.exact(s, name, depth) for s in schema["anyOf"]])
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        if kind == "integer":
            everyday = st.integers(schema.get("minimum", 0), schema.get("maximum", 200))
            return everyday | st.integers(schema.get("minimum", -2**65), schema.get("maximum", 2**65))
        if kind == "number":
            everyday = st.floats(schema.get("minimum", 0.0), schema.get("maximum", 1.0))
            return everyday | st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False,
                                        allow_infinity=False)
        if kind == "string":
            return st.text(max_size=40)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            return st.lists(self.for_schema(schema.get("items", {}), name, depth + 1), max_size=4)
        if kind == "object" or "properties" in schema:
            return self.object(schema, depth)
        return ANY_JSON  # no type: anything

    def object(self, schema: dict, depth: int) -> st.SearchStrategy:
        properties = {k: v for k, v in schema.get("properties", {}).items() if k not in SLOW_FIELDS}
        required = [k for k in schema.get("required", []) if k in properties]
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not properties:
            return st.dictionaries(st.text(max_size=8), self.for_schema(extra, "", depth + 1), max_size=4)
        fixed = st.fixed_dictionaries({k: self.for_schema(properties[k], k, depth + 1) for k in required})
        optional = sorted(k for k in properties if k not in required)
        if not optional:
            return fixed

        def with_some(chosen: list[str]) -> st.SearchStrategy:
            more = st.fixed_dictionaries({k: self.for_schema(properties[k], k, depth + 1) for k in chosen})
            return st.builds(lambda a, b: {**a, **b}, fixed, more)

        return st.lists(st.sampled_from(optional), max_size=MAX_OPTIONAL, unique=True).flatmap(with_some)
