"""The package layers of docs/architecture.md: imports only point down the list.

Checked on the source (every import, including those inside functions), so a cycle
such as evaluation ⇄ training cannot come back unnoticed. Runs without the data.
"""

from __future__ import annotations

import ast
from pathlib import Path

import medlens

# Lowest first. A package may import itself and anything before it in this list.
LAYERS = (
    "errors",
    "_yaml",
    "config",
    "io",
    "knowledge",
    "models",
    "datasets",
    "embeddings",
    "analysis",
    "explain",
    "retrieval",
    "report",
    "pipeline",
    "distributed",
    "evaluation",
    "training",
    "audit",
    "api",
    "cli",
    "ui",
)
ROOT = Path(medlens.__file__).parent


def _unit(path: Path) -> str:
    first = path.relative_to(ROOT).with_suffix("").parts[0]
    return "medlens" if first == "__init__" else first


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "medlens":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("medlens."))
    return out


def test_every_package_has_a_layer() -> None:
    units = {_unit(p) for p in ROOT.rglob("*.py")} - {"medlens"}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_imports_only_point_down() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        unit = _unit(path)
        if unit == "medlens":  # the package's lazy facade (medlens.MedLens)
            continue
        for target in _imports(path):
            if target in rank and rank[target] > rank[unit]:
                upward.append(f"{path.relative_to(ROOT)} imports medlens.{target}")
    assert not upward, "\n".join(upward)
