"""LLaVA's (and LLaVA-NeXT's) checkpoint tensor names -> ("visual" | "language", our parameter name).

Three layouts transformers has written:
- 5.x:     `model.vision_tower.embeddings.*`, `model.language_model.*`, `lm_head.*`, `model.image_newline`
- 4.52+:   the same with `model.vision_tower.vision_model.*` (CLIPVisionModel's inner module)
- older:   `vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`,
           `multi_modal_projector.*` and `image_newline` at the top level
"""


def rename(name: str) -> tuple[str, str] | None:
    name = name.removeprefix("model.")
    if name.startswith("language_model.model."):
        return "language", "language_model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model.lm_head."):
        return "language", name.removeprefix("language_model.")
    if name.startswith(("language_model.", "lm_head.")):
        return "language", name
    if name.startswith("vision_tower.vision_model."):
        return "visual", "vision_tower." + name.removeprefix("vision_tower.vision_model.")
    if name.startswith(("vision_tower.", "multi_modal_projector.")) or name == "image_newline":
        return "visual", name
    return None
