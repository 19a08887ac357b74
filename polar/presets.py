"""Named configuration presets shipped with the package (temporary; replaced by the packaging work)."""
from __future__ import annotations

from pathlib import Path

_DIRS = [Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent / "configs"]


def resolve_config(name_or_path: str) -> str:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return str(p)
    for d in _DIRS:
        f = d / f"{name_or_path}.yaml"
        if f.is_file():
            return str(f)
    return str(p)
