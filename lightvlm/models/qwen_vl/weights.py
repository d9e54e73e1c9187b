"""Qwen-VL checkpoint tensor names -> ("visual" | "language", our parameter name).

Both layouts transformers has written: `model.visual.*` + `model.language_model.*` (Qwen3-VL, and
Qwen2/2.5-VL converted by transformers 5 in memory) and `visual.*` + `model.*` (what the Hub's
Qwen2-VL / Qwen2.5-VL checkpoints hold, and what transformers 5 saves them back as). The three
vision towers name their layers three ways; ours have one set of names.
"""

# checkpoint spelling -> ours, inside the vision tower
VISION_NAMES = (
    ("merger.ln_q.", "merger.norm."),
    ("merger.mlp.0.", "merger.fc1."),
    ("merger.mlp.2.", "merger.fc2."),
    ("deepstack_merger_list.", "deepstack_mergers."),
    (".linear_fc1.", ".fc1."),
    (".linear_fc2.", ".fc2."),
)


def rename(name: str) -> tuple[str, str] | None:
    name = name.removeprefix("model.") if name.startswith(("model.visual.", "model.language_model.")) else name
    if name.startswith("visual."):
        ours = "tower." + name.removeprefix("visual.")
        for theirs, mine in VISION_NAMES:
            ours = ours.replace(theirs, mine)
        return "visual", ours
    if name.startswith("language_model."):
        return "language", name
    if name.startswith("model."):
        return "language", "language_model." + name.removeprefix("model.")
    if name.startswith("lm_head."):
        return "language", name
    return None
