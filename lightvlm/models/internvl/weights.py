"""InternVL's checkpoint tensor names -> ("visual" | "language", our parameter name)."""


def rename(name: str) -> tuple[str, str] | None:
    """Both layouts transformers has written: >= 4.52 (`model.language_model.*`, `lm_head.*`) and older
    (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*` at top level)."""
    name = name.removeprefix("model.")
    if name.startswith("language_model.model."):
        return "language", "language_model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model.lm_head."):
        return "language", name.removeprefix("language_model.")
    if name.startswith(("language_model.", "lm_head.")):
        return "language", name
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "visual", name
    return None
