"""A text-only checkpoint's tensor names (`model.*`, `lm_head.*`) -> ("language", our name)."""

from lightvlm.models.decoder_weights import decoder_name, head_name


def rename(name: str) -> tuple[str, str] | None:
    if name.startswith("model."):
        return "language", "language_model." + decoder_name(name.removeprefix("model."))
    head = head_name(name)
    return ("language", head) if head else None
