"""The LLaVA-NeXT demo checkpoint (weights from the shared demo kit, processor files from transformers):
deterministic, tiny, in the Hugging Face layout, and served as transformers runs it."""

import hashlib
import json

from lightvlm import GenerationConfig, pipeline
from lightvlm.models.demo import main

from helpers import load_image
from hf_reference import hf_messages
from llava_references import assert_same_greedy, hf_generate


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_demo_is_deterministic_tiny_and_runs_as_in_transformers(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        main(["--arch", "llava_next", "--size", "tiny", "--backbone", "llama", "--out", str(out)])
    assert digest(first) == digest(second)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= {p.name for p in first.iterdir()}
    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert (first / "model.safetensors").stat().st_size < 4 * 1_000_000  # under a million fp32 parameters

    images = [load_image("rocket.jpg")]
    reference, inputs = hf_generate(first, hf_messages("Describe this image.", images), 24)
    ours = pipeline(first, max_batch_size=2, session_len=512, max_total_token_num=1024, data_type="fp32")(
        ("Describe this image.", images), GenerationConfig(max_new_tokens=24))
    assert_same_greedy(first, ours.token_ids, reference, inputs, "llava_next demo")
