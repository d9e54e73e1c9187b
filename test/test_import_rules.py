"""The room import rules of ARCHITECTURE.md section 5, checked on the source (for the rooms that exist)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lightvlm"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(folder: str):
    return sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else []


def lightvlm_imports(path: Path) -> set[str]:
    return {n for n in imports_of(path) if n == "lightvlm" or n.startswith("lightvlm.")}


def violations(paths, allowed) -> list[str]:
    return [f"{p.relative_to(ROOT.parent)} imports {name}" for p in paths for name in lightvlm_imports(p)
            if not allowed(name)]


def test_pure_python_engine_parts_import_no_torch():
    for name in ("scheduler.py", "req.py", "token_allocator.py"):
        heavy = {n for n in imports_of(ROOT / "engine" / name) if n.split(".")[0] in ("torch", "numpy", "triton")}
        assert not heavy, f"engine/{name} imports {heavy}"


def test_router_uses_only_the_pure_engine_parts():
    pure = ("lightvlm.engine.scheduler", "lightvlm.engine.req", "lightvlm.engine.token_allocator")
    bad = violations(files("server/router"),
                     lambda n: not n.startswith("lightvlm.engine") or n.startswith(pure))
    assert not bad, bad


def test_httpserver_uses_only_processors_and_checkpoint_facts_of_the_model_side():
    light = ("lightvlm.models.processor", "lightvlm.models.checkpoint", "lightvlm.models.registry",
             "lightvlm.models.video")

    def allowed(name):
        if name.startswith(("lightvlm.server.router", "lightvlm.workers", "lightvlm.visualserver",
                            "lightvlm.engine", "lightvlm.pipeline")):
            return False
        if name.startswith("lightvlm.models"):
            return name.startswith(light) or ".processor" in name
        return True

    bad = violations(files("server/httpserver"), allowed)
    assert not bad, bad


def test_what_the_httpserver_opens_imports_no_torch():
    light = [ROOT / "models" / n for n in ("processor.py", "checkpoint.py", "registry.py", "text_config.py",
                                            "video.py")]
    for path in [*light, *ROOT.glob("models/*/processor.py"), *ROOT.glob("models/*/config.py"),
                 *ROOT.glob("models/*/weights.py"), *ROOT.glob("models/*/video.py")]:
        heavy = {n for n in imports_of(path) if n.split(".")[0] in ("torch", "safetensors")}
        assert not heavy, f"{path.relative_to(ROOT)} imports {heavy}"


def test_one_face_does_not_import_the_other():
    faces = {name: f"lightvlm.server.httpserver.{name}" for name in ("native_api", "openai_api")}
    for name, module in faces.items():
        others = tuple(m for m in faces.values() if m != module)
        bad = violations([ROOT / "server" / "httpserver" / f"{name}.py"], lambda n, o=others: not n.startswith(o))
        assert not bad, bad


def test_the_pipeline_imports_nothing_of_the_server():
    bad = violations([ROOT / "pipeline.py"], lambda n: not n.startswith(("lightvlm.server", "lightvlm.visualserver")))
    assert not bad, bad


def test_workers_serve_both_shells_and_import_neither():
    bad = violations(files("workers"), lambda n: not n.startswith(("lightvlm.server", "lightvlm.visualserver",
                                                                    "lightvlm.pipeline")))
    assert not bad, bad


def test_the_launcher_imports_no_model_code():
    bad = violations([ROOT / "server" / "launcher.py"], lambda n: not n.startswith("lightvlm.models"))
    # the entry point asks for the demo checkpoint through its one function, and nothing else of models/
    bad += violations([ROOT / "server" / "api_server.py"],
                      lambda n: not n.startswith("lightvlm.models") or n.startswith("lightvlm.models.demo"))
    assert not bad, bad


def test_families_import_no_other_family():
    families = [p for p in (ROOT / "models").iterdir() if p.is_dir() and p.name not in ("layers", "__pycache__")]
    for family in families:
        others = tuple(f"lightvlm.models.{f.name}" for f in families if f != family)
        bad = violations(sorted(family.rglob("*.py")), lambda n, o=others: not n.startswith(o))
        assert not bad, bad


def test_models_import_no_engine_server_or_pipeline():
    forbidden = ("lightvlm.engine", "lightvlm.server", "lightvlm.visualserver", "lightvlm.pipeline")
    bad = violations(files("models"), lambda n: not n.startswith(forbidden))
    assert not bad, bad


def test_engine_imports_no_server_or_pipeline():
    forbidden = ("lightvlm.server", "lightvlm.visualserver", "lightvlm.pipeline")
    bad = violations(files("engine"), lambda n: not n.startswith(forbidden))
    assert not bad, bad


def test_common_imports_nothing_else_of_lightvlm():
    bad = violations(files("common"), lambda n: n.startswith("lightvlm.common"))
    assert not bad, bad


def test_rooms_meet_only_in_io_struct_and_config():
    rooms = {"server/httpserver": "lightvlm.server.httpserver", "server/router": "lightvlm.server.router",
             "server/detokenization": "lightvlm.server.detokenization", "visualserver": "lightvlm.visualserver"}
    for folder, package in rooms.items():
        others = tuple(p for p in rooms.values() if p != package)
        bad = violations(files(folder), lambda n, others=others: not n.startswith(others))
        assert not bad, bad
