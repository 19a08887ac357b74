"""The check every configuration setting declares, and `setting()`, the dataclass field that carries it.

A check receives (dotted name, value) after type coercion and raises ConfigError naming the
setting; its `rule` says in words what it accepts (the tests list every field with it).
"""
from __future__ import annotations

import math
import re
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

SET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LONE_SET = "eval"  # the name of an evaluation set given by its path alone


def _is_dataset(path: str) -> bool:
    return Path(path).exists() or Path(path + ".idx").is_file()


def named_datasets(where: str, v: str) -> list[tuple[str, str]]:
    """`PATH` (one set, named "eval") or `NAME=PATH,NAME=PATH,...` -> [(name, path)] in the order given. A
    name (letters, digits, _ and -) becomes the set's key in the metrics, TensorBoard and summary.json. An
    entry that is itself an existing path is a path, so a directory with "=" in its name still reads as
    before; a path with a comma cannot be given (a symbolic link can)."""
    if not v:
        return []
    entries = [e.strip() for e in v.split(",")]
    if not all(entries):
        raise ConfigError(f"{where}={v}: an empty entry (two commas, or one at an end); give PATH, or "
                          "NAME=PATH,NAME=PATH")
    sets = []
    for e in entries:
        name, eq, path = e.partition("=")
        sets.append((name, path) if eq and SET_NAME.fullmatch(name) and not _is_dataset(e) else (None, e))
    if len(sets) == 1 and sets[0][0] is None:
        return [(LONE_SET, sets[0][1])]
    unnamed = [path for name, path in sets if name is None]
    if unnamed:
        raise ConfigError(f"{where}={v}: several evaluation sets need a name each, NAME=PATH,NAME=PATH ({unnamed[0]} "
                          "has none; a name is letters, digits, _ and -, up to 64)")
    names = [name for name, _ in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}={v}: the set name {twice[0]} is given twice; each set needs its own")
    return sets


def named_dataset_paths_or_empty(where, v):
    for name, path in named_datasets(where, v):
        if path == v.strip():  # one set given by its path: the message as for data.path
            dataset_path_or_empty(where, path)
        elif not _is_dataset(path):
            raise ConfigError(f"{where}={v}: set {name}: {path}: no such dataset directory or shard (a shard is "
                              "named without its suffix: the path of its .idx without .idx)")


def joined_named_paths(where: str, mapping: dict) -> str:
    """A YAML mapping of set names to paths ({held_out: ds/ho, seen: ds/seen}) as named_datasets reads it."""
    for name, path in mapping.items():
        if not (isinstance(name, str) and SET_NAME.fullmatch(name)):
            raise ConfigError(f"{where}: the set name {name!r} is not letters, digits, _ and - (up to 64)")
        if not isinstance(path, str) or not path or "," in path:
            raise ConfigError(f"{where}: set {name}: expected a dataset's path (without a comma), got {path!r}")
    return ",".join(f"{name}={path}" for name, path in mapping.items())


named_dataset_paths_or_empty.rule = ("empty, a built dataset (a directory, or one shard's path without its suffix), or "
                                     "several named: NAME=PATH,NAME=PATH")


def setting(default, check, false_means=None, from_mapping=None, **kw):
    """A dataclass field with its start-up check (see `validate`). `false_means`: the string a YAML
    `false` stands for (YAML 1.1 reads a bare `off` or `no` as false, so `train.fp8=off` arrives as it).
    `from_mapping(where, mapping)`: the string a YAML mapping given for this string setting stands for."""
    metadata = {"check": check}
    if false_means is not None:
        metadata["false_means"] = false_means
    if from_mapping is not None:
        metadata["from_mapping"] = from_mapping
    return field(default=default, metadata=metadata, **kw)
