"""What every family's processor shares: tokenizer, chat template, and placeholder expansion.

A processor turns a conversation (or a raw prompt with image placeholders) plus the images' sizes
into prompt ids in which each image occupies a span of embedding rows. It needs only the sizes to
do so, which the httpserver reads from the image header; the pixels are preprocessed separately
(`preprocess`), where the vision encoder runs.

This module and the families' `processor.py` are the only model code the httpserver imports: no
torch here.
"""

import importlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

# Placeholders any family accepts in a raw prompt (the native /generate API); families add their own.
GENERIC_PLACEHOLDERS = ("<img></img>", "<image>")


class PromptError(ValueError):
    """The prompt and the images do not fit together; the message says how."""


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's embedding rows sit in the prompt ids."""

    offset: int  # index of the first embedding row
    length: int  # number of embedding rows (tiles x tokens per tile for InternVL)


@dataclass
class Prompt:
    input_ids: list[int]
    image_spans: list[ImageSpan] = field(default_factory=list)


@dataclass(frozen=True)
class ImageLayout:
    """How one image of a given size is cut and how many embedding rows it becomes."""

    num_tiles: int
    num_rows: int
    span_ids: tuple[int, ...]  # the ids of the whole span, start/end markers included
    first_row: int  # index of the first embedding row inside span_ids


def load_processor(processor_class: str, model_dir: str | Path) -> "BaseProcessor":
    """Import "module:Class" (a family's processor) and build it from the checkpoint folder."""
    module, name = processor_class.split(":")
    return getattr(importlib.import_module(module), name).from_model_dir(model_dir)


# Sampling settings a checkpoint's generation_config.json may set; a request that leaves them unset gets
# the checkpoint's value (as transformers' generate() and vLLM do), else the usual default.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def generation_defaults(model_dir: str | Path) -> dict:
    config = read_json(Path(model_dir) / "generation_config.json")
    defaults = dict(SAMPLING_DEFAULTS)
    defaults.update({k: config[k] for k in SAMPLING_DEFAULTS if config.get(k) is not None})
    if defaults["top_k"] == 0:
        defaults["top_k"] = -1
    return defaults


def load_chat_template(model_dir: Path) -> str | None:
    """The checkpoint's Jinja chat template, from wherever transformers would have saved it."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.exists():
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):  # named templates: take the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return None


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def compile_chat_template(source: str) -> jinja2.Template:
    # The same environment transformers renders templates in, so the text is identical.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


class BaseProcessor:
    """Family processors set `image_token` (the placeholder their chat template emits), and implement
    `image_layout(width, height)` and `preprocess(image)`."""

    image_token: str

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "BaseProcessor":
        """Build from the checkpoint folder alone (reads what it needs from config.json)."""
        raise NotImplementedError

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer  # tokenizers-backed; the same class transformers uses

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        template = load_chat_template(self.model_dir)
        self.chat_template = compile_chat_template(template) if template else None
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        names = sorted({self.image_token, *GENERIC_PLACEHOLDERS}, key=len, reverse=True)
        self.placeholder_re = re.compile("|".join(re.escape(n) for n in names))  # raw prompts (/generate)
        self.chat_placeholder_re = re.compile(re.escape(self.image_token))  # what the chat template writes

    # -- text ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages in the HF form: content is a string or parts {"type": "text"|"image", ...}."""
        if self.chat_template is None:
            raise PromptError(f"{self.model_dir} has no chat template; send a raw prompt to /generate instead")
        special = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        return self.chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, **special)

    def encode(self, text: str, image_sizes: list[tuple[int, int]], add_special_tokens: bool = True,
               placeholders: re.Pattern | None = None) -> Prompt:
        """Tokenize `text`, expanding its i-th image placeholder into the span of the i-th image.

        image_sizes are (width, height). Raises PromptError when the counts differ. By default the
        family's tag, `<image>` and `<img></img>` all mark images (raw prompts).
        """
        pieces = (placeholders or self.placeholder_re).split(text)
        if len(pieces) - 1 != len(image_sizes):
            raise PromptError(f"the prompt has {len(pieces) - 1} image placeholder(s) but {len(image_sizes)} "
                              f"image(s) were given; put one placeholder ({self.image_token}, <image> or "
                              "<img></img>) where each image goes")
        # One marker token per image, then each marker is swapped for the image's span ids. Added
        # tokens are split off before BPE runs, so this equals tokenizing the expanded text.
        marked = self.image_token.join(pieces)
        ids = self.tokenizer(marked, add_special_tokens=add_special_tokens)["input_ids"]
        prompt = Prompt(input_ids=[])
        sizes = iter(image_sizes)
        for token in ids:
            if token != self.image_token_id:
                prompt.input_ids.append(token)
                continue
            layout = self.image_layout(*next(sizes))
            offset = len(prompt.input_ids) + layout.first_row
            prompt.image_spans.append(ImageSpan(offset, layout.num_rows))
            prompt.input_ids.extend(layout.span_ids)
        return prompt

    def encode_chat(self, messages: list[dict], image_sizes: list[tuple[int, int]],
                    add_generation_prompt: bool = True) -> Prompt:
        text = self.apply_chat_template(messages, add_generation_prompt)
        # As transformers does: a template that writes BOS itself must not get a second one; and only
        # the tag the template writes for an image marks one (a user may write "<image>" as text).
        bos = self.tokenizer.bos_token
        return self.encode(text, image_sizes, add_special_tokens=not (bos and text.startswith(bos)),
                           placeholders=self.chat_placeholder_re)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- images (family-specific) ----------------------------------------------------------------

    @property
    def settings(self) -> str:
        """The preprocessing settings, hashed together with an image's bytes into its cache key."""
        raise NotImplementedError

    def image_layout(self, width: int, height: int) -> ImageLayout:
        raise NotImplementedError

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """image -> pixel values [tiles, 3, S, S] float32, exactly as the reference processor."""
        raise NotImplementedError


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what the HF image processors do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def rescale_and_normalize(pixels: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], with the same float steps as transformers."""
    x = (pixels.astype(np.float64) * scale).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def split_messages(messages: list[dict]) -> tuple[list[dict], list]:
    """OpenAI/GPT-4V-style messages -> (messages as chat templates expect them, image sources in order).

    Content parts: {"type": "text", "text"}, {"type": "image_url", "image_url": {"url"} | str} and
    {"type": "image", "image" | "url" | "path": ...}. Each image becomes {"type": "image"} where it
    appeared; its source (a URL, a path or a PIL image) is returned in order.
    """
    templated, sources = [], []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise PromptError(f"each message needs a 'role' and 'content', got {message!r:.100}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            templated.append({**message, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise PromptError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                url = part.get("image_url")
                sources.append(url.get("url") if isinstance(url, dict) else url)
                parts.append({"type": "image"})
            elif kind == "image":
                sources.append(next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None))
                parts.append({"type": "image"})
            else:
                raise PromptError(f"unsupported content part type {kind!r}; use 'text', 'image_url' or 'image'")
        templated.append({**message, "content": parts})
    return templated, sources
