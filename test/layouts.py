"""An InternVL folder that transformers 5 wrote, converted into the other layouts users have:

- `legacy_layout`: as transformers 4.x wrote it (`preprocessor_config.json`, `chat_template.json`,
  tensors under `model.language_model.*` / `lm_head.*`);
- `original_layout`: OpenGVLab's InternVLChatModel folder, written with the inverse of transformers'
  conversion (convert_internvl_weights_to_hf.py); with `internlm2=True` the Llama decoder becomes an
  InternLM2 one (its names, q/k/v packed into `wqkv` per KV head as modeling_internlm2.py reads it),
  so transformers' Llama on the unfused weights is its reference.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# ChatML over string contents: what text-only checkpoints and the original InternVL folders carry
# (their templates know no content parts).
TEXT_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}")
# InternLM2 chat models' template: it writes BOS itself
INTERNLM2_CHAT = "{{ bos_token }}" + TEXT_CHATML


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def legacy_layout(src: Path, out: Path) -> Path:
    """The transformers 4.x form of a 5.x InternVL folder: the image processor in its own
    preprocessor_config.json, the processor's template in chat_template.json, tensors named as 4.52-4.57
    saved them (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`)."""
    shutil.copytree(src, out)
    processor = json.loads((out / "processor_config.json").read_text())
    image_processor = processor.pop("image_processor")
    image_processor.update(image_processor_type="GotOcr2ImageProcessorFast", processor_class="InternVLProcessor")
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    template = (out / "chat_template.jinja").read_text()
    (out / "chat_template.jinja").unlink()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tensors = load_file(out / "model.safetensors")
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name.removeprefix("language_model.model.")
        elif name.startswith("language_model.lm_head."):
            name = name.removeprefix("language_model.")
        else:
            name = "model." + name
        renamed[name] = tensor
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return out


# transformers' InternVL vision names -> OpenGVLab's (the inverse of convert_internvl_weights_to_hf.py)
VISION_NAMES = (
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.", ".attn."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
    ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."),
    ("multi_modal_projector.linear_2.", "mlp1.3."),
)
# Llama's decoder names -> InternLM2's
INTERNLM2_NAMES = (
    ("embed_tokens.", "tok_embeddings."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_proj.", ".feed_forward.w1."),
    (".mlp.up_proj.", ".feed_forward.w3."),
    (".mlp.down_proj.", ".feed_forward.w2."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
)


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """InternLM2's wqkv (modeling_internlm2.py): rows grouped per KV head, its query heads first, then
    its key head and its value head. Works on weights [rows, hidden] and biases [rows]."""
    head_dim = k.shape[0] // num_kv_heads
    groups = q.shape[0] // k.shape[0]
    rest = tuple(q.shape[1:])
    parts = [q.reshape(num_kv_heads, groups, head_dim, *rest), k.reshape(num_kv_heads, 1, head_dim, *rest),
             v.reshape(num_kv_heads, 1, head_dim, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def original_tensors(tensors: dict, num_kv_heads: int, internlm2: bool) -> dict:
    out = {}
    for name, tensor in tensors.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            for theirs, ours in VISION_NAMES:
                name = name.replace(theirs, ours)
            if ".attn.q_proj." in name:  # [q; k; v] -> attn.qkv
                parts = [tensors_by_role(tensors, name, role) for role in "qkv"]
                out[name.replace(".attn.q_proj.", ".attn.qkv.")] = torch.cat(parts)
            elif ".attn.k_proj." not in name and ".attn.v_proj." not in name:
                out[name] = tensor
            continue
        if name == "language_model.lm_head.weight":
            out["language_model.output.weight" if internlm2 else name] = tensor
            continue
        if not internlm2:
            out[name] = tensor
            continue
        hf_name = name
        for theirs, ours in INTERNLM2_NAMES:
            name = name.replace(theirs, ours)
        if ".self_attn.q_proj." in hf_name:
            q, k, v = (tensors[hf_name.replace(".q_proj.", f".{role}_proj.")] for role in "qkv")
            out[name.replace(".self_attn.q_proj.", ".attention.wqkv.")] = pack_wqkv(q, k, v, num_kv_heads)
        elif ".self_attn.k_proj." not in hf_name and ".self_attn.v_proj." not in hf_name:
            out[name] = tensor
    return out


def tensors_by_role(tensors: dict, original_name: str, role: str) -> torch.Tensor:
    """The HF tensor for q, k or v of the vision attention whose original-layout name is given."""
    layer = original_name.split(".")[3]
    leaf = original_name.rsplit(".", 1)[1]
    return tensors[f"vision_tower.encoder.layer.{layer}.attention.{role}_proj.{leaf}"]


def original_config(hf: dict, internlm2: bool) -> dict:
    text, vision = hf["text_config"], hf["vision_config"]
    rope = dict(text["rope_parameters"])
    theta = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", "default")
    rope_scaling = None if rope_type == "default" else {"type": rope_type, "rope_type": rope_type, **rope}
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
            "pad_token_id", "hidden_act", "initializer_range")
    llm = {k: text[k] for k in keep if k in text}
    llm.update(rope_theta=theta, rope_scaling=rope_scaling, tie_word_embeddings=False)
    if internlm2:
        # InternLM2 has no head_dim key (it is hidden / heads) and one `bias` for wqkv and wo
        assert text.get("head_dim") in (None, text["hidden_size"] // text["num_attention_heads"])
        llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=text["attention_bias"],
                   auto_map={"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    else:
        llm.update(architectures=[f"{text['model_type'].capitalize()}ForCausalLM"], model_type=text["model_type"])
        if text["model_type"] == "llama":
            llm["attention_bias"] = text.get("attention_bias", False)
        if "head_dim" in text:
            llm["head_dim"] = text["head_dim"]
    image_size = vision["image_size"][0]
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "force_image_size": image_size, "downsample_ratio": hf["downsample_ratio"],
        "select_layer": hf["vision_feature_layer"], "ps_version": "v2",
        "template": "internlm2-chat" if internlm2 else "internvl2_5",
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
        "use_backbone_lora": 0, "use_llm_lora": 0, "tie_word_embeddings": False, "llm_config": llm,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
            "hidden_size": vision["hidden_size"], "intermediate_size": vision["intermediate_size"],
            "num_attention_heads": vision["num_attention_heads"], "num_hidden_layers": vision["num_hidden_layers"],
            "image_size": image_size, "patch_size": vision["patch_size"][0], "num_channels": 3,
            "qkv_bias": vision["attention_bias"], "qk_normalization": vision["use_qk_norm"],
            "norm_type": vision["norm_type"], "layer_norm_eps": vision["layer_norm_eps"], "hidden_act": "gelu",
            "initializer_factor": vision["layer_scale_init_value"], "use_flash_attn": False,
            "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0},
    }


def original_layout(src: Path, out: Path, internlm2: bool = False) -> Path:
    """OpenGVLab's InternVLChatModel folder holding the weights of the HF folder `src`."""
    out.mkdir(parents=True)
    hf = json.loads((src / "config.json").read_text())
    config = original_config(hf, internlm2)
    config["max_dynamic_patch"] = json.loads((src / "processor_config.json").read_text())["image_processor"][
        "max_patches"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(src / "model.safetensors")
    if "language_model.lm_head.weight" not in tensors:  # the original is always untied
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    packed = original_tensors(tensors, hf["text_config"]["num_key_value_heads"], internlm2)
    save_file(packed, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(src / name, out / name)
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config.pop("processor_class", None)
    tokenizer_config["chat_template"] = INTERNLM2_CHAT if internlm2 else TEXT_CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    # what OpenGVLab folders ship and their code never reads (CLIP-style, no tiling keys)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 448}))
    return out
