"""Loading a run configuration: engine.config's dataclasses filled from a YAML file (over the files
its `base:` lines name) and `a.b=value` command-line overrides, each value read as its setting's type
and checked, an error naming the setting after the file and line, or the command line, that gave it;
and a config written back as YAML.
"""
from __future__ import annotations

import dataclasses
import datetime
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from engine import yaml_load
from engine.config import traced, validate
from engine.near_miss import near_field
from engine.setting_checks import ConfigError


@dataclass(frozen=True)
class Source:
    """Where a setting's value came from: a config file and the line of its key, or the command line."""

    file: Optional[str] = None  # None: the command line
    line: Optional[int] = None
    # a preset shipped with the package (a `base:` name, register_named_bases), not a
    # file of the user's: its values are defaults the user did not choose
    shipped: bool = False

    def __str__(self) -> str:
        if self.file is None:
            return "command line"
        return f"{self.file}:{self.line}" if self.line else self.file


def set_by_user(sources: dict, name: str) -> bool:
    """Whether a file of the user's or the command line set the setting `name` (a.b) in the load that
    filled `sources`; a preset's value and the default are not the user's choice."""
    source = sources.get(name)
    return source is not None and not source.shipped


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return _build(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, bool, datetime.date)):
            # YAML 1.1 has already rewritten an unquoted 0700, 12:30, 1.10, 1_000 or yes into
            # another value; str() of it would silently be a different string from the one written
            raise ConfigError(f"{where}: expected a string, but the YAML value was read as "
                              f"{type(value).__name__} {value!r}; quote it ({where.rsplit('.', 1)[-1]}: "
                              f"\"...\") so it is kept exactly as written")
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class _Override:
    """A command-line value: its text as typed and that text read as a YAML scalar. A string setting
    takes the text (YAML would turn run_dir=0700 into 448 and 12:30 into 750), or the string a quoted
    text stands for (run_dir='' is the empty string); others take the value."""

    text: str
    value: Any

    def _string(self) -> str:
        quoted = len(self.text) >= 2 and self.text[0] == self.text[-1] and self.text[0] in "'\""
        return self.value if quoted and isinstance(self.value, str) else self.text

    def resolve(self, typ: Any, false_means: Optional[str] = None) -> Any:
        if self.value is False and false_means is not None:
            return false_means
        if typ is str:
            return self._string()
        if typing.get_origin(typ) is typing.Union and str in typing.get_args(typ):
            return None if self.value is None else self._string()
        return self.value


def _unknown_setting(cls, values: dict, where: str, root=None) -> Optional[tuple[str, str]]:
    """(key, message) for the first key of `values` that names no field of `cls`, else None. `root`:
    the whole config's class, whose other sections a key may belong to."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if not unknown:
        return None
    prefix = f"{where}." if where else ""
    elsewhere = [(q, section) for q, section in _qualified(root) if q.rpartition(".")[0] != where] if root else []
    meant = _did_you_mean(unknown[0], names, prefix, elsewhere)
    return unknown[0], (f"unknown setting '{prefix}{unknown[0]}'{meant}; valid keys{' of ' + where if where else ''}: "
                        + ", ".join(sorted(names)))


def _qualified(cls, prefix: str = ""):
    """(section.key, whether it is a section) for every section and setting of the config class `cls`."""
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        section = dataclasses.is_dataclass(types[f.name])
        yield prefix + f.name, section
        if section:
            yield from _qualified(types[f.name], f"{prefix}{f.name}.")


# A misspelt setting or section (train.stpes, trian, data.seq_len, train.LR) is named with the one it
# most likely meant: difflib's ratio at least 0.7 (stpes/steps 0.8, seq_len/seq_length 0.82), which
# leaves out tensor_parallel/sequence_parallel (0.69), another setting rather than a misspelling
NEAR_MISS_CUTOFF = 0.7


def _did_you_mean(key, names, prefix: str = "", elsewhere=()) -> str:
    """` (did you mean 'PREFIXname'?)` for the one of `names` that `key` most likely misspells, else "".
    A key that is a setting or section elsewhere (`elsewhere`: (section.key, whether a section) of the
    others) is said to be there instead, a fact, not a guess at what was meant (data.dir: `there is
    'checkpoint.dir'`, not the dataset's data.path): train.save_interval was pointed at
    train.eval_interval, its own section's near miss, where checkpoint.save_interval exists."""
    there = [f"the section {q!r}" if section else repr(q) for q, section in elsewhere
             if q.rpartition(".")[2] == str(key).lower()]
    if there:
        return f" (there {'is' if len(there) == 1 else 'are'} {' and '.join(there)})"
    near = near_field(str(key), sorted(names), cutoff=NEAR_MISS_CUTOFF, fold_case=True)
    return f" (did you mean '{prefix}{near}'?)" if near else ""


def _build(cls, values: dict, where: str, sources: Optional[dict] = None, root=None):
    types = _field_types(cls)
    root = cls if root is None and not where else root
    unknown = _unknown_setting(cls, values, where, root)
    if unknown:
        raise traced(ConfigError(unknown[1]), f"{where}.{unknown[0]}" if where else str(unknown[0]), sources)
    obj = cls()
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    for key, value in values.items():
        sub = f"{where}.{key}" if where else key
        if isinstance(value, _Override):
            value = value.resolve(types[key], meta[key].get("false_means"))
        elif value is False and "false_means" in meta[key]:
            value = meta[key]["false_means"]
        elif isinstance(value, dict) and "from_mapping" in meta[key]:
            try:
                value = meta[key]["from_mapping"](sub, value)
            except ConfigError as e:
                raise traced(e, sub, sources) from None
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _merge(current, value, sub, sources, root)
        else:
            try:
                value = _coerce(value, types[key], sub)
            except ConfigError as e:
                raise traced(e, sub, sources) from None
        setattr(obj, key, value)
    return obj


def _merge(obj, values: dict, where: str, sources: Optional[dict] = None, root=None):
    merged = dataclasses.asdict(obj)
    _deep_update(merged, values)
    return _build(type(obj), merged, where, sources, root)


def updated(obj, values: dict, where: str):
    """A copy of the config section `obj` with `values` (its settings' names) read and checked as a
    file's would be; an error names the setting as `where`.name."""
    new = _merge(obj, values, where)
    validate(new, where)
    return new


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _misplaced_key(cls, values: dict, where: str = "", root=None) -> Optional[tuple[list, str]]:
    """(the keys leading to it, message) for the first key of a file's `values` that is no setting of
    `cls`, or a section given a value that is no mapping; None when the keys fit. The values
    themselves are checked once merged: a command-line override may still replace one."""
    root = cls if root is None and not where else root
    unknown = _unknown_setting(cls, values, where, root)
    if unknown:
        return [unknown[0]], unknown[1]
    for f in dataclasses.fields(cls):
        sub = f"{where}.{f.name}" if where else f.name
        if f.name not in values or not dataclasses.is_dataclass(_field_types(cls)[f.name]):
            continue
        value = values[f.name]
        if not isinstance(value, dict):
            return [f.name], f"{sub}: expected a mapping of settings, got {value!r}"
        inner = _misplaced_key(_field_types(cls)[f.name], value, sub, root)
        if inner:
            return [f.name, *inner[0]], inner[1]
    return None


def _key_lines(text: str) -> dict:
    """a.b -> the 1-based line of that key in a YAML text, for every key reached through mappings
    (a key that only a merge `<<:` brings has none)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict = {}
    todo = [(root, "", ())]
    while todo:
        node, prefix, above = todo.pop()
        if not isinstance(node, yaml.MappingNode) or id(node) in above:  # an alias may name a mapping it is in
            continue
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                lines[prefix + key.value] = key.start_mark.line + 1
                todo.append((value, f"{prefix}{key.value}.", above + (id(node),)))
    return lines


def _paths(values: dict, prefix: str = ""):
    """Every key of a nested mapping as a.b, sections and the settings inside them."""
    for key, value in values.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}.")


# `base:` names that are no file beside the config naming them: engine/ must not import polar/, so
# polar/presets.py registers its presets here when imported (`base: tiny_cpu` is the shipped file)
_named_bases: list = []


def register_named_bases(find, names) -> None:
    """`find(name)`: the config file a `base:` name stands for, or None; `names()`: the names, for
    the message when a base is neither a file nor one of them."""
    if (find, names) not in _named_bases:
        _named_bases.append((find, names))


def _shipped(path: Path) -> bool:
    """Whether `path` is the file a registered `base:` name stands for (a preset)."""
    for find, _ in _named_bases:
        found = find(path.name)
        if found is not None and Path(found).resolve() == path.resolve():
            return True
    return False


def base_file(config: Path, base: str) -> str:
    """The file a config file's `base: NAME` names: a file beside it, else a preset of that name."""
    beside = config.parent / base
    if beside.is_file():  # a file wins over a name, as for --config
        return str(beside)
    for find, _ in _named_bases:
        found = find(base)
        if found is not None:
            return str(found)
    known = sorted(n for _, names in _named_bases for n in names())
    raise ConfigError(f"{config}: base: {base}: {not_a_config(base, beside, known, show_path=True)}")


def not_a_config(name: str, path: Path, presets: list, show_path: bool = False) -> str:
    """Why `name` (--config's argument, or a `base:` line's, looked for as the file `path` and as one of
    `presets`) names no config: a directory is said to be one (it was 'no such file'), and the preset
    a name most likely misspells (polar_7 for polar_7b) is named before the presets are listed."""
    at = f" ({path})" if show_path else ""
    listed = f" (presets: {', '.join(presets)})" if presets else ""
    if path.is_dir():
        return f"a directory{at}, not a config file; name a YAML file{' or a preset' if presets else ''}{listed}"
    stem = Path(name).stem if Path(name).suffix in (".yaml", ".yml") else name
    bare = presets and Path(name).name == name  # a path with folders is never a preset's name
    near = near_field(stem, presets, cutoff=NEAR_MISS_CUTOFF, fold_case=True) if bare else None
    return f"no such file{at}" + (f", and not a preset{f': did you mean {near!r}?' if near else ''}{listed}"
                                  if presets else "")


def parse_overrides(overrides: list[str]) -> dict:
    """`train.lr=1e-5 parallel.tp=2` -> nested dict. A scalar value is an _Override (its text, and the
    text parsed as YAML), resolved by the type of the setting it lands on; a mapping or list stays parsed."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            parsed = yaml_load.safe_load(raw) if raw != "" else ""
        except yaml_load.DuplicateKeyError as e:
            raise ConfigError(f"override '{item}': {e.reason}") from None
        except yaml.YAMLError:
            parsed = raw  # not YAML (run_dir=[x): fine for a string setting, refused by any other
        value = parsed if isinstance(parsed, (dict, list)) else _Override(raw, parsed)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            # `train={lr: 1}` sets train.lr, as a file's `train:` section does: it replaced the whole
            # section, so an earlier `train.steps=10` was dropped without a word
            _deep_update(node[parts[-1]], value)
        else:
            node[parts[-1]] = value  # a setting given twice: the last wins, as wrappers appending rely on
    return tree


def load_config(cls, path: Optional[str] = None, overrides: Optional[list[str]] = None, *,
                ignore: tuple = (), check: bool = True, sources: Optional[dict] = None):
    """Defaults of `cls`, then the YAML file at `path` (over the files its `base:` names), then
    command-line overrides; every value is checked once merged, and an error names the file and line
    that set it (the last in a base chain, the one whose value is kept) or the command line. `ignore`:
    top-level sections dropped from the file (and its bases) and the overrides, for a reader of one
    recipe's files that does not know the other recipes' sections (`polar plan`). `check=False`: the
    values are not checked (--print-config shows a config that still lacks a required setting).
    `sources`: a dict filled with a.b -> Source for every setting a file or the command line gave."""
    found: dict = {}
    values = _file_values(cls, Path(path), ignore, (), found) if path else {}
    if overrides:
        parsed = parse_overrides(overrides)
        for name in ignore:
            parsed.pop(name, None)
        _deep_update(values, parsed)
        found.update((name, Source()) for name in _paths(parsed))
    cfg = _build(cls, values, "", found)
    if check:
        validate(cfg, sources=found)
    if sources is not None:
        sources.update(found)
    return cfg


def _file_values(cls, p: Path, ignore: tuple, chain: tuple, sources: dict) -> dict:
    """The settings a config file gives over those of its `base:` chain, unchecked (a later file or
    the command line may still replace a value); `sources` gets where each came from."""
    if not p.is_file():
        raise ConfigError(f"{p}: a directory, not a config file" if p.is_dir() else f"config file not found: {p}")
    here = p.resolve()
    if here in chain:
        names = [str(f) for f in chain[chain.index(here):]] + [str(here)]
        raise ConfigError(f"{p}: base: files name each other in a cycle: {' -> '.join(names)}")
    text = p.read_text()
    try:
        loaded = yaml_load.safe_load(text, str(p))
    except yaml_load.DuplicateKeyError as e:
        raise ConfigError(f"{p}:{e.line}: {e.reason}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    values = loaded or {}
    for name in ignore:
        values.pop(name, None)
    has_base, base = "base" in values, values.pop("base", None)
    lines = _key_lines(text)
    # the keys are checked file by file, where a misplaced one is still the file's own
    misplaced = _misplaced_key(cls, values)
    if misplaced:
        line = lines.get(".".join(map(str, misplaced[0])))
        raise ConfigError(f"{p}{f':{line}' if line else ''}: {misplaced[1]}")
    if has_base:  # a file may build on another: a file beside it, or a preset's name
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{p}: base={base!r}: expected the path of another config file, or a preset's "
                              "name")
        merged = _file_values(cls, Path(base_file(p, base)), ignore, chain + (here,), sources)
        _deep_update(merged, values)
    else:
        merged = values
    shipped = _shipped(p)
    sources.update((name, Source(str(p), lines.get(name), shipped)) for name in _paths(values))
    return merged


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
