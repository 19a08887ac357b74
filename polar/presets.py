"""The run presets that ship inside the package (polar/configs/*.yaml), and `--config` resolution.

    resolve_config("polar_7b")           -> .../site-packages/polar/configs/polar_7b.yaml
    resolve_config("polar_7b.yaml")      -> the same, unless ./polar_7b.yaml exists
    resolve_config("my_runs/big.yaml")   -> my_runs/big.yaml

A file that exists wins over a preset of the same name, so a user's own `tiny_cpu.yaml` in the working
directory is never shadowed. Presets are plain files on disk (pip unpacks wheels), so a `base:` line inside
one resolves next to it, as for any other config file. A config file's `base:` may name a preset too
(`base: tiny_cpu`), unless a file of that name lies beside it.
"""
from __future__ import annotations

from pathlib import Path

from engine.config import ConfigError
from engine.config_load import not_a_config, register_named_bases

PRESETS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "tiny_cpu"
_SUFFIXES = (".yaml", ".yml")


def preset_names() -> list[str]:
    """Names accepted by `--config`, without their .yaml suffix."""
    return sorted(p.stem for p in PRESETS_DIR.iterdir() if p.suffix in _SUFFIXES)


def preset_path(name: str) -> Path | None:
    """The shipped file for a preset name (with or without its suffix), or None."""
    if not name or Path(name).name != name:  # a path with folders is never a preset name
        return None
    stem = Path(name).stem if Path(name).suffix in _SUFFIXES else name
    for suffix in _SUFFIXES:
        p = PRESETS_DIR / (stem + suffix)
        if p.is_file():
            return p
    return None


def resolve_config(name_or_path: str | None = None, option: str = "--config") -> str:
    """The config file `--config` means: an existing file, else a preset name; None gives the default preset.

    Raises ConfigError naming the argument (as `option`: `polar hparams` calls it --preset) and the presets
    when it is neither (a directory said as one, a near miss of a preset's name named).
    """
    if name_or_path is None:
        name_or_path = DEFAULT_PRESET
    if Path(name_or_path).is_file():
        return str(name_or_path)
    preset = preset_path(name_or_path)
    if preset is not None:
        return str(preset)
    raise ConfigError(f"{option} {name_or_path}: {not_a_config(name_or_path, Path(name_or_path), preset_names())}")


register_named_bases(preset_path, preset_names)
