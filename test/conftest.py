"""Shared fixtures: the tiny demo checkpoints and the transformers-written reference checkpoints (each
built once per session)."""

import os
import shutil
from pathlib import Path

import pytest

from lightvlm.models.demo import build_demo_checkpoint


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_qwen2(checkpoints_dir) -> Path:
    """InternVL, Qwen2 backbone, under 1M parameters."""
    return build_demo_checkpoint(checkpoints_dir / "tiny-qwen2", size="tiny", backbone="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(checkpoints_dir) -> Path:
    """InternVL, Llama backbone with other shapes: 6 heads / 2 KV heads, 3 layers, 96-pixel tiles."""
    return build_demo_checkpoint(checkpoints_dir / "tiny-llama", size="tiny", backbone="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_tools(tiny_qwen2, checkpoints_dir) -> Path:
    """tiny_qwen2 with Qwen2.5's chat template for tools (fixtures/qwen2_5_tools_template.jinja, which also
    places images): the checkpoint for tool calls. The weights are linked, not copied."""
    out = checkpoints_dir / "tiny-qwen2-tools"
    out.mkdir(exist_ok=True)
    for path in tiny_qwen2.iterdir():
        target = out / path.name
        if not target.exists():
            target.symlink_to(path) if path.suffix == ".safetensors" else shutil.copy(path, target)
    shutil.copy(Path(__file__).parent / "fixtures" / "qwen2_5_tools_template.jinja", out / "chat_template.jinja")
    return out


@pytest.fixture(scope="session", params=["tiny_qwen2", "tiny_llama"])
def tiny_checkpoint(request) -> Path:
    return request.getfixturevalue(request.param)



@pytest.fixture(scope="session")
def small_checkpoint(checkpoints_dir) -> Path:
    """The demo/benchmark checkpoint: about 27M parameters with real InternVL tile geometry."""
    return build_demo_checkpoint(checkpoints_dir / "small", size="small")


@pytest.fixture(scope="session")
def llava_checkpoints(checkpoints_dir):
    """LLaVA / LLaVA-NeXT checkpoints written by transformers' save_pretrained, each built on first use:
    `.get(name)` for a name of llava_references.REFERENCES."""
    from llava_references import ReferenceCheckpoints

    return ReferenceCheckpoints(checkpoints_dir / "llava")


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def qwen_vl_reference(request, checkpoints_dir) -> Path:
    """A Qwen-VL checkpoint (model and processor) written by transformers' own save_pretrained, one per
    model of the line, each with shapes of its own (test/qwen_vl_references.py)."""
    from qwen_vl_references import reference_checkpoint

    return reference_checkpoint(checkpoints_dir, request.param)


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """Checkpoints written by transformers (test/references.py), each built on first use."""
    from references import ReferenceLibrary

    return ReferenceLibrary(tmp_path_factory.mktemp("references"))


@pytest.fixture(scope="session")
def video_fixtures(tmp_path_factory) -> dict[str, Path]:
    """The test videos (test/video_fixtures.py), made with PyAV from the test photos: name -> path."""
    from video_fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("videos"))
