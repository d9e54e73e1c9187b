"""What every family's processor shares: tokenizer, chat template, and placeholder expansion.

A processor turns a conversation (or a raw prompt with image placeholders) plus the images' sizes
into prompt ids in which each image occupies a span of embedding rows. It needs only the sizes to
do so, which the httpserver reads from the image header; the pixels are preprocessed separately
(`preprocess`), where the vision encoder runs.

Videos (models/video.py) go the same way: the httpserver decodes and samples a video's frames, the
family lays it out as parts (each a span of rows, placed like an image), and the pixels are made from
the frames where the vision encoder runs.

This module and the families' `processor.py` are the only model code the httpserver imports: no
torch here.
"""

import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from lightvlm.common.errors import PromptError
from lightvlm.io_struct import ImageItem
from lightvlm.models.video import (
    FrameSettings,
    VideoLayout,
    VideoMeta,
    VideoPart,
    VideoSampling,
    VideoSource,
    video_part,
)

# Placeholders any family accepts in a raw prompt (the native /generate API); families add their own.
GENERIC_PLACEHOLDERS = ("<img></img>", "<image>")
GENERIC_VIDEO_PLACEHOLDER = "<video>"


@dataclass(frozen=True)
class SpanOrigin:
    """Where a span of image rows comes from: the `index`-th image, or a part of the `index`-th video."""

    kind: str  # "image" | "video"
    index: int
    part: VideoPart | None = None


@dataclass
class Prompt:
    input_ids: list[int]
    images: list[ImageItem] = field(default_factory=list)  # placed (offset, num_rows, grid), not yet named
    origins: list[SpanOrigin] = field(default_factory=list)  # one per item of `images`


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


class GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (LLaVA's templates wrap the assistant's text in it):
    transformers tracks where the block's text lands for its assistant masks; rendered, it is its body,
    in a scope of its own as transformers' call block gives it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def compile_chat_template(source: str) -> jinja2.Template:
    # The same environment transformers renders templates in, so the text is identical.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlock])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def find_image_processor_settings(model_dir: Path) -> tuple[dict, str] | None:
    """The image processor's settings from wherever transformers wrote them: inside
    processor_config.json (`image_processor`, transformers 5) or preprocessor_config.json (4.x).
    Returns (settings, the file they came from), or None when neither file has them."""
    nested = read_json(model_dir / "processor_config.json").get("image_processor")
    if nested:
        return nested, "processor_config.json"
    legacy = read_json(model_dir / "preprocessor_config.json")
    if legacy:
        return legacy, "preprocessor_config.json"
    return None


def image_processor_settings(model_dir: Path) -> tuple[dict, str]:
    """As `find_image_processor_settings`; never a silent default: none found is an error."""
    found = find_image_processor_settings(model_dir)
    if found is None:
        raise ValueError(f"{model_dir} has no image processor settings: looked for `image_processor` in "
                         "processor_config.json (transformers 5) and for preprocessor_config.json (transformers 4)")
    return found


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer, as transformers loads it, without running code from the folder: a
    tokenizer_config.json that points at the checkpoint's own tokenizer class (`auto_map`, as InternLM2
    folders do) is read from its tokenizer.json with transformers' generic fast tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # tokenizers-backed, as transformers uses

    config = read_json(model_dir / "tokenizer_config.json")
    auto_map = config.get("auto_map") or {}
    if isinstance(auto_map, dict) and "AutoTokenizer" not in auto_map:
        return AutoTokenizer.from_pretrained(str(model_dir))
    if not (model_dir / "tokenizer.json").exists():
        raise ValueError(f"{model_dir / 'tokenizer_config.json'} names the checkpoint's own tokenizer code "
                         f"({config.get('tokenizer_class')}, auto_map) and the folder has no tokenizer.json; "
                         "lightvlm never runs checkpoint code. Write a tokenizer.json into the folder once, e.g. "
                         "AutoTokenizer.from_pretrained(folder, trust_remote_code=True).save_pretrained(folder)")
    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))


class BaseProcessor:
    """What every family's processor shares. A family sets `image_token` (the placeholder its chat
    template writes) and implements `settings`, `image_grid`, `image_span` and `preprocess`; a
    text-only family leaves them and `image_token` unset. A family that takes videos sets
    `video_token` (its chat template's video tag) and implements the video methods below."""

    image_token: str | None = None
    # transformers' processors add the tokenizer's special tokens to a chat unless the template wrote
    # BOS itself; its tokenizers (text-only models) never add them to a chat
    adds_special_tokens_to_chats: bool = True
    video_token: str | None = None

    @property
    def raw_image_marker(self) -> str:
        """What one image placeholder of a raw prompt (/generate) becomes before tokenizing; a family whose
        chat template wraps its tag (Qwen-VL: start tag, pad, end tag) writes the whole wrapping here."""
        return self.image_token

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        template = load_chat_template(self.model_dir)
        self.chat_template = compile_chat_template(template) if template else None
        self.image_token_id = None
        if self.image_token is not None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer in {self.model_dir} has no {self.image_token} token, which this "
                                 "model's prompts need for images")
            names = sorted({self.image_token, *GENERIC_PLACEHOLDERS}, key=len, reverse=True)
            self.placeholder_re = re.compile("|".join(re.escape(n) for n in names))  # raw prompts (/generate)
            self.chat_placeholder_re = re.compile(re.escape(self.image_token))  # what the chat template writes
        # Why this model takes no videos (None: it takes them); a family may set a reason of its own.
        self.video_refusal: str | None = None
        if self.video_token is None:
            self.video_refusal = ("this model takes no videos" + (" (a text-only language model)" if self.image_token
                                                                  is None else "; send chosen frames as images"))
        else:
            names = sorted({self.video_token, GENERIC_VIDEO_PLACEHOLDER}, key=len, reverse=True)
            self.video_placeholder_re = re.compile("|".join(re.escape(n) for n in names))
            self.chat_video_re = re.compile(re.escape(self.video_token))

    def token_id(self, token: str) -> int:
        """The id of a token the family's prompts need; a clear error if the tokenizer lacks it."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer in {self.model_dir} has no {token} token, which this model needs")
        return token_id

    # -- text ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                            **template_kwargs) -> str:
        """messages in the HF form: content is a string or parts {"type": "text"|"image", ...}; `tools` are
        OpenAI-style function tools, which the template renders as it defines (transformers' argument)."""
        if self.chat_template is None:
            raise PromptError(f"{self.model_dir} has no chat template; send a raw prompt to /generate instead")
        special = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        variables = {"documents": None, **special, **template_kwargs}
        return self.chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                         **variables)

    def encode(self, text: str, grids: list[tuple[int, ...]], add_special_tokens: bool = True,
               placeholders: re.Pattern | None = None, videos: list[VideoMeta] = ()) -> Prompt:
        """Tokenize `text`, expanding its i-th image placeholder into the span of the image of grid i
        (`image_grid` of its size) and its j-th video placeholder into the layout of video j. Raises
        PromptError when the counts differ. By default the family's tag, `<image>` and `<img></img>` mark
        images and the family's video tag and `<video>` videos (raw prompts); `placeholders` (the chat
        template's image tag) switches to the tags the chat template writes."""
        if self.image_token is None:
            if grids or videos:
                raise PromptError("this model takes no images (a text-only language model)")
            return Prompt(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if videos and self.video_refusal:
            raise PromptError(self.video_refusal)
        is_chat = placeholders is not None
        matches, kinds = self._placeholders(text, placeholders or self.placeholder_re, is_chat)
        for kind, given, tags in (("image", len(grids), f"{self.image_token}, <image> or <img></img>"),
                                  ("video", len(videos), f"{self.video_token} or {GENERIC_VIDEO_PLACEHOLDER}")):
            found = kinds.count(kind)
            if found != given:
                raise PromptError(f"the prompt has {found} {kind} placeholder(s) but {given} {kind}(s) were given; "
                                  f"put one placeholder ({tags}) where each {kind} goes")
        # One marker token per span, then each marker is swapped for the span's ids. Added tokens are
        # split off before BPE runs, so this equals tokenizing the expanded text. The chat template's
        # tags stay themselves; a raw prompt's placeholder gets the wrapping.
        pieces, spans, cursor, counts = [], [], 0, {"image": 0, "video": 0}
        for match, kind in zip(matches, kinds):
            pieces.append(text[cursor:match.start()])
            cursor = match.end()
            index = counts[kind]
            counts[kind] += 1
            if kind == "image":
                pieces.append(self.image_token if is_chat else self.raw_image_marker)
                spans.append(SpanOrigin("image", index))
                continue
            layout = self.video_layout(videos[index])
            pieces.append(layout.text if is_chat else self.wrap_raw_video(layout.text))
            spans += [SpanOrigin("video", index, part) for part in layout.parts]
        pieces.append(text[cursor:])
        ids = self.tokenizer("".join(pieces), add_special_tokens=add_special_tokens)["input_ids"]
        return self._expand(ids, spans, grids)

    def _placeholders(self, text: str, image_re: re.Pattern, is_chat: bool) -> tuple[list, list[str]]:
        """The media placeholders of `text` in order, and which kind each is."""
        video_re = None if self.video_refusal else (self.chat_video_re if is_chat else self.video_placeholder_re)
        if video_re is None:
            matches = list(image_re.finditer(text))
            return matches, ["image"] * len(matches)
        both = re.compile(f"(?P<image>{image_re.pattern})|(?P<video>{video_re.pattern})")
        matches = list(both.finditer(text))
        return matches, ["image" if m.group("image") is not None else "video" for m in matches]

    def _expand(self, ids: list[int], spans: list[SpanOrigin], grids: list[tuple[int, ...]]) -> Prompt:
        prompt = Prompt(input_ids=[])
        spans = iter(spans)
        for token in ids:
            if token != self.image_token_id:
                prompt.input_ids.append(token)
                continue
            origin = next(spans, None)
            if origin is None:
                raise PromptError(f"the prompt holds {self.image_token} where no image goes")
            if origin.kind == "image":
                grid, seconds = grids[origin.index], None
                span_ids, first_row, num_rows = self.image_span(grid)
            else:
                grid, seconds = origin.part.grid, origin.part.seconds_per_step
                span_ids, first_row, num_rows = self.video_span(origin.part)
            prompt.images.append(ImageItem("", len(prompt.input_ids) + first_row, num_rows, grid,
                                           seconds_per_step=seconds))
            prompt.origins.append(origin)
            prompt.input_ids.extend(span_ids)
        return prompt

    def encode_chat(self, messages: list[dict], grids: list[tuple[int, ...]],
                    add_generation_prompt: bool = True, tools: list | None = None, videos: list[VideoMeta] = (),
                    **template_kwargs) -> Prompt:
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs)
        # As transformers does: a template that writes BOS itself must not get a second one; and only
        # the tag the template writes for an image marks one (a user may write "<image>" as text).
        bos = self.tokenizer.bos_token
        add_special_tokens = self.adds_special_tokens_to_chats and not (bos and text.startswith(bos))
        return self.encode(text, grids, add_special_tokens=add_special_tokens,
                           placeholders=self.chat_placeholder_re if self.image_token else None, videos=videos)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- images (family-specific) ----------------------------------------------------------------

    @property
    def settings(self) -> str:
        """The preprocessing settings, hashed together with an image's bytes into its key."""
        raise NotImplementedError

    def image_grid(self, width: int, height: int, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> tuple[int, ...]:
        """How an image of this size is laid out (tiles, or patches at its resized resolution). The pixel
        bounds are a request's own (from `check_pixel_bounds`); families without them never get any."""
        raise NotImplementedError

    def check_pixel_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
        """One image's requested resolution bounds -> the keyword arguments `image_grid` takes for it.
        Raises PromptError, with a message for the client, for bounds this processor does not allow."""
        if min_pixels is None and max_pixels is None:
            return {}
        raise PromptError("min_pixels / max_pixels are for dynamic-resolution models (such as Qwen-VL); this "
                          "model lays images out as fixed-size tiles, so leave them out")

    def with_pixel_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> "BaseProcessor":
        """This processor with the server's own resolution bounds (--min_pixels / --max_pixels)."""
        if min_pixels is None and max_pixels is None:
            return self
        raise ValueError("--min_pixels / --max_pixels are for dynamic-resolution models (such as Qwen-VL); this "
                         "model lays images out as fixed-size tiles")

    def image_span(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        """(the span's ids, start/end markers included; index of its first embedding row; number of rows)"""
        raise NotImplementedError

    def preprocess(self, image: Image.Image, grid: tuple[int, ...]) -> np.ndarray:
        """image -> pixel values for `grid`, exactly as the reference processor makes them."""
        raise NotImplementedError

    # -- videos (family-specific; see models/video.py) --------------------------------------------

    @property
    def video_settings(self) -> str:
        """The frame settings, hashed into the key of each part of a video."""
        raise NotImplementedError

    frame_settings: FrameSettings  # set by a family that takes videos

    def sample_frames(self, total_frames: int, fps: float | None, sampling: VideoSampling) -> tuple[int, ...]:
        """Which frames of a video of `total_frames` frames at `fps` to take (indices, as transformers'
        video processor of the family picks them). Raises models.video.VideoRequestError."""
        raise NotImplementedError

    def video_layout(self, video: VideoMeta) -> VideoLayout:
        """The text that replaces the video's placeholder, with a marker for each part. Raises PromptError."""
        raise NotImplementedError

    def wrap_raw_video(self, text: str) -> str:
        """A raw prompt's video placeholder -> what the chat template would have written around the layout."""
        return text

    def video_span(self, part: VideoPart) -> tuple[tuple[int, ...], int, int]:
        """(the part's span ids, index of its first embedding row, number of rows)"""
        raise NotImplementedError

    def frame_size(self, grid: tuple[int, ...]) -> tuple[int, int]:
        """(height, width) the frames of a part of this grid are resized to."""
        raise NotImplementedError

    def patchify_frames(self, frames: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
        """A part's resized, normalized frames [k, 3, H, W] float32 -> its pixel values for the vision tower."""
        raise NotImplementedError


class TextProcessor(BaseProcessor):
    """Text-only language models: tokenizer and chat template, no images."""

    adds_special_tokens_to_chats = False

    def __init__(self, model_dir: str | Path, config=None):
        super().__init__(model_dir)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what the HF image processors do). 16-bit
    grayscale is scaled to 8 bits first (PIL's own conversion clips it, so that a 16-bit PNG would come
    out all white, in transformers too); CMYK, palettes and animations' first frames are PIL's."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8))
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


def split_media(messages: list[dict]) -> tuple[list[dict], list, list[VideoSource]]:
    """OpenAI/GPT-4V-style messages -> (messages as chat templates expect them, image sources in order,
    video sources in order).

    Content parts: {"type": "text", "text"}, {"type": "image_url", "image_url": {"url"} | str},
    {"type": "image", "image" | "url" | "path": ...}, {"type": "video_url", "video_url": {"url", "fps",
    "num_frames"} | str} and {"type": "video", "video" | "url" | "path": ..., "fps", "num_frames"}. Each
    image becomes {"type": "image"} and each video {"type": "video"} where it appeared.
    """
    templated, sources, videos = [], [], []
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
            elif kind in ("video_url", "video"):
                videos.append(video_part(part))
                parts.append({"type": "video"})
            else:
                raise PromptError(f"unsupported content part type {kind!r}; use 'text', 'image_url', 'image', "
                                  "'video_url' or 'video'")
        templated.append({**message, "content": parts})
    return templated, sources, videos


def split_messages(messages: list[dict]) -> tuple[list[dict], list]:
    """`split_media` for callers that take images only: a video part is an error."""
    templated, sources, videos = split_media(messages)
    if videos:
        raise PromptError("video parts are not accepted here")
    return templated, sources


def decode_image(data: bytes) -> Image.Image:
    """An image file's bytes -> a fully decoded PIL image (the one decode both shells do), turned upright
    as its EXIF orientation says (what transformers' load_image does: a phone photo is not sideways)."""
    image = Image.open(io.BytesIO(data))
    orientation = exif_orientation(image)  # what the header says, as the httpserver read it
    image.load()
    method = EXIF_TURNS.get(orientation)
    return image if method is None else image.transpose(method)


EXIF_ORIENTATION = 0x0112
EXIF_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # as PIL.ImageOps.exif_transpose


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) from the metadata read with the header, without decoding (PIL's
    getexif would decode a whole PNG to look for it)."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # noqa: BLE001 (broken metadata: the image as stored)
        return 1
    return exif.get(EXIF_ORIENTATION, 1)
