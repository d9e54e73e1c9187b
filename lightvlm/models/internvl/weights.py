"""InternVL's checkpoint tensor names -> ("visual" | "language", our parameter name), for both layouts.

Ours are transformers' names (model.py follows them). The original layout's names are mapped with the
inverse of transformers' own conversion (convert_internvl_weights_to_hf.py); its fused tensors keep a
name the weight loader unpacks: InternViT's `attn.qkv` ([q; k; v]) and InternLM2's `wqkv`.
"""

import re

from lightvlm.models.decoder_weights import decoder_name, head_name


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


# OpenGVLab's InternViT + mlp1 names -> transformers' (applied in order, each at most once)
ORIGINAL_VISUAL_NAMES = (
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.", r"vision_tower.encoder.layer.\1."),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),  # qkv (fused), q_norm, k_norm
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.ls1$", ".lambda_1"),
    (r"\.ls2$", ".lambda_2"),
    (r"^mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "multi_modal_projector.linear_2."),
)


def rename_original(name: str) -> tuple[str, str] | None:
    """The original layout: `vision_model.*`, `mlp1.*`, `language_model.model.*` (InternLM2, Qwen2 or
    Llama names) and `language_model.lm_head.*` / `language_model.output.*`."""
    if name.startswith("language_model."):
        inner = name.removeprefix("language_model.")
        if inner.startswith("model."):
            return "language", "language_model." + decoder_name(inner.removeprefix("model."))
        head = head_name(inner)
        return ("language", head) if head else None
    if not name.startswith(("vision_model.", "mlp1.")):
        return None
    for pattern, replacement in ORIGINAL_VISUAL_NAMES:
        name = re.sub(pattern, replacement, name, count=1)
    return "visual", name
