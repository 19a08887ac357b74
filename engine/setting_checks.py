"""The check every configuration setting declares, and `setting()`, the dataclass field that carries it.

A check receives (dotted name, value) after type coercion and raises ConfigError naming the
setting; its `rule` says in words what it accepts (the tests list every field with it).
"""
from __future__ import annotations

import math
from dataclasses import field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem, always naming the offending setting."""


def _finite(where: str, v) -> None:
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{where}={v}: must be a finite number")


def at_least(lo):
    def check(where, v):
        _finite(where, v)
        if v < lo:
            raise ConfigError(f"{where}={v}: must be >= {lo}")
    check.rule = f">= {lo}"
    return check


def positive(where, v):
    _finite(where, v)
    if v <= 0:
        raise ConfigError(f"{where}={v}: must be > 0")


positive.rule = "> 0"


def in_range(lo, hi, hi_open=False):
    def check(where, v):
        _finite(where, v)
        if v < lo or v > hi or (hi_open and v == hi):
            raise ConfigError(f"{where}={v}: must lie in [{lo}, {hi}{')' if hi_open else ']'}")
    check.rule = f"in [{lo}, {hi}{')' if hi_open else ']'}"
    return check


def one_of(*choices):
    def check(where, v):
        if v not in choices:
            raise ConfigError(f"{where}={v!r}: expected one of {', '.join(map(str, choices))}")
    check.rule = "one of " + ", ".join(map(str, choices))
    return check


def optional(inner):
    def check(where, v):
        if v is not None:
            inner(where, v)
    check.rule = f"null or {getattr(inner, 'rule', '')}"
    return check


def boolean(where, v):
    """Type coercion already refused anything but true/false."""


boolean.rule = "true or false"


def non_empty(where, v):
    if not v.strip():
        raise ConfigError(f"{where}: must not be empty")


non_empty.rule = "a non-empty string"


def directory_to_create(where, v):
    """Empty (a default applies) or a directory path: it may not exist yet, but must not be a file."""
    if v and Path(v).is_file():
        raise ConfigError(f"{where}={v}: is a file; a directory is expected")


directory_to_create.rule = "empty, or a directory (created if missing)"


def file_path_or_empty(where, v):
    """Empty (none) or a file's path: it need not exist, but must not be a directory."""
    if v and Path(v).is_dir():
        raise ConfigError(f"{where}={v}: is a directory; a file's path is expected")


file_path_or_empty.rule = "empty, or a file's path (need not exist)"


def run_directory(where, v):
    non_empty(where, v)
    directory_to_create(where, v)


run_directory.rule = "a directory (created if missing)"


def existing_path_or_empty(where, v):
    if v and not Path(v).exists():
        raise ConfigError(f"{where}={v}: no such file or directory")


existing_path_or_empty.rule = "empty, or an existing path"


def dataset_path_or_empty(where, v):
    # a dataset directory, or one shard named without its suffix (part-00000-of-00001)
    if v and not Path(v).exists() and not Path(v + ".idx").is_file():
        raise ConfigError(f"{where}={v}: no such dataset directory or shard (a shard is named without its "
                          "suffix: the path of its .idx without .idx)")


dataset_path_or_empty.rule = "empty, or a built dataset (a directory, or one shard's path without its suffix)"


def setting(default, check, false_means=None, **kw):
    """A dataclass field with its start-up check (see `validate`). `false_means`: the string a YAML
    `false` stands for (YAML 1.1 reads a bare `off` or `no` as false, so `train.fp8=off` arrives as it)."""
    metadata = {"check": check}
    if false_means is not None:
        metadata["false_means"] = false_means
    return field(default=default, metadata=metadata, **kw)
