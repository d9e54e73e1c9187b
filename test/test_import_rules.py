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


def test_httpserver_uses_only_processors_of_the_engine_side():
    def allowed(name):
        if name.startswith(("lightvlm.server.router", "lightvlm.server.worker", "lightvlm.visualserver",
                            "lightvlm.engine", "lightvlm.pipeline")):
            return False
        if name.startswith("lightvlm.models"):
            return name.startswith("lightvlm.models.processor") or ".processor" in name
        return True

    bad = violations(files("server/httpserver"), allowed)
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
             "server/worker": "lightvlm.server.worker", "server/detokenization": "lightvlm.server.detokenization",
             "visualserver": "lightvlm.visualserver"}
    for folder, package in rooms.items():
        others = tuple(p for p in rooms.values() if p != package)
        bad = violations(files(folder), lambda n, others=others: not n.startswith(others))
        assert not bad, bad


def test_processors_import_no_torch():
    for path in [ROOT / "models" / "processor.py", *ROOT.glob("models/*/processor.py")]:
        heavy = {n for n in imports_of(path) if n.split(".")[0] == "torch"}
        assert not heavy, f"{path.name} imports {heavy}"
