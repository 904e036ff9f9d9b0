"""The import contract: ``labeling/`` (the ML core) imports nothing from the rest of ``backend/``, ``studio/``
(everything about Label Studio) loads no torch, and the modules of ``backend/`` import each other without a cycle
(imports inside functions count: they are the same dependency, paid later)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the ``backend`` modules it imports (module level or inside functions)."""
    modules = {module_name(p): p for p in (REPO / "backend").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + [node.module] if node.module else base)
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_labeling_core_imports_nothing_else_from_the_backend():
    outside = {(m, d) for m, deps in import_graph().items() if m.startswith("backend.labeling")
               for d in deps if not d.startswith("backend.labeling")}
    assert not outside


def test_the_studio_package_never_imports_torch():
    studio = sorted(m for m in import_graph() if m.startswith("backend.studio."))
    code = (f"import sys; import {', '.join(studio)}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout == "[]\n"


def test_the_backend_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path + [module, dep]
            if dep not in state and (cycle := visit(dep, path + [module])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " → ".join(cycle)


def test_the_contract_checker_sees_a_relative_import():
    graph = import_graph()
    assert "backend.labeling.clip" in graph["backend.labeling.pipeline"]       # `from .clip import Clip`
    assert "backend.studio.label_config" in graph["backend.studio.results"]


def test_the_settings_load_no_torch():
    """The settings, the model spec and its version fingerprint are plain data: reading them loads no ML library."""
    code = ("import sys; from backend.config import Settings; s = Settings.from_env({'PROFILE': 'cpu'}); "
            "s.model_spec(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout == "[]\n"
