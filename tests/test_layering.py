"""The two layers stay apart: engine/ knows nothing of POLAR's text format (only its entry scripts
compose it with polar/), and polar/ never reaches into megatron (it goes through engine/)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = {"engine/pretrain.py", "engine/finetune.py", "engine/score.py", "engine/evaluate.py"}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every package the module imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str) -> list[str]:
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py"))
    assert len(found) > 10, found  # the tree, not an empty folder
    return found


@pytest.mark.parametrize("package, forbidden, allowed", [
    ("engine", "polar", ENTRY_SCRIPTS),
    ("polar", "megatron", set()),
])
def test_a_layer_imports_only_what_its_side_may(package, forbidden, allowed):
    found = modules(package)
    assert allowed <= set(found)
    bad = [m for m in found if m not in allowed and forbidden in imported_packages(ROOT / m)]
    assert not bad, f"{', '.join(bad)} import {forbidden}; {package}/ must not"


def test_the_check_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from polar.format import encode_groups\n    import megatron.core\n")
    assert imported_packages(src) == {"os", "polar", "megatron"}
