"""dvc.yaml tells the truth: each stage's deps cover every module it imports and every config
file it reads, so `dvc repro` cannot miss a change that alters its results."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(path: Path) -> set[str]:
    """Package modules ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("l2sweep"):
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("l2sweep")}
    return names


def closure(entry: str) -> set[Path]:
    """Every package file that running ``python -m entry`` executes (packages' __init__ too)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported(path))
    return seen


def stages() -> dict[str, dict]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = {}
    for name, stage in dvc["stages"].items():
        deps = []
        for dep in stage.get("deps", []):
            if dep.startswith("${paths."):
                dep = params["paths"][dep[len("${paths."):-1]]
            deps.append((REPO / dep).resolve())
        out[name] = {"entry": stage["cmd"].split("-m ", 1)[1].split()[0], "deps": deps}
    return out


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


def test_every_stage_depends_on_every_module_it_runs():
    for name, stage in stages().items():
        files = closure(stage["entry"])
        assert len(files) > 3, (name, files)  # the walk found the package
        missing = sorted(str(f.relative_to(REPO)) for f in files if not covered(f, stage["deps"]))
        assert not missing, f"dvc.yaml stage {name}: deps miss {missing}"


def test_every_stage_depends_on_every_config_file_it_composes():
    # Every stage composes conf/ with Hydra (the defaults list and any group a user picks).
    configs = [p for p in (REPO / "conf").rglob("*.yaml")]
    assert configs
    for name, stage in stages().items():
        missing = sorted(str(p.relative_to(REPO)) for p in configs if not covered(p, stage["deps"]))
        assert not missing, f"dvc.yaml stage {name}: deps miss {missing}"


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from l2sweep.base import files\n")
    assert "l2sweep.base.files" in imported(source)
