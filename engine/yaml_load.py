"""yaml.safe_load, refusing a key given twice in one mapping.

YAML requires a mapping's keys to be unique, but PyYAML keeps the last value and drops the other
without a word: a config file with two `train:` sections would lose every setting of the first.
"""
from __future__ import annotations

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping; `line` counts from 1."""

    def __init__(self, key, line: int):
        self.key, self.line = key, line
        self.reason = (f"key {key!r} given twice in one mapping (which one is meant? a YAML reader keeps the "
                       "last and drops the other)")
        super().__init__(f"line {line}: {self.reason}")


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges keys that the mapping's own keys may override
                key = self.construct_object(key_node, deep=deep)
                try:
                    twice = key in seen
                except TypeError:  # an unhashable key: the base class says so
                    break
                if twice:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(stream, name: str | None = None):
    """yaml.safe_load's value; DuplicateKeyError (a yaml.YAMLError) for a key given twice. `name`: the
    file a text was read from, which a syntax error's position names (PyYAML names a text it is handed
    as a string "<unicode string>": `in "<unicode string>", line 2, column 7`)."""
    loader = _UniqueKeyLoader(stream)
    if name is not None:
        loader.name = name  # every mark (a position an error names) takes the reader's name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
