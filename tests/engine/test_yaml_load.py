"""engine.yaml_load.safe_load: yaml.safe_load's values, except a key given twice in one mapping,
which PyYAML keeps the last of without a word (YAML requires the keys of a mapping to be unique)."""
import pytest
import yaml

from engine.yaml_load import DuplicateKeyError, safe_load


@pytest.mark.parametrize("text", [
    "", "a: 1\n", "train:\n  steps: 5\nmodel:\n  steps: 5\n",  # the same key in two mappings is fine
    "- name: a\n- name: a\n",  # and in two list entries
    "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n",  # a merge's keys may be overridden
    "a: [1, {b: 2}]\nc: null\n'1': x\n1: y\n",  # the string '1' and the integer 1 are two keys
])
def test_what_yaml_safe_load_reads_reads_the_same(text):
    assert safe_load(text) == yaml.safe_load(text)


@pytest.mark.parametrize("text, key, line", [
    ("train:\n  steps: 5\ntrain:\n  lr: 0.1\n", "train", 3),
    ("train:\n  steps: 5\n  lr: 1\n  steps: 6\n", "steps", 4),
    ("a: 1\nb: {x: 1, x: 2}\n", "x", 2),
    ("- name: a\n  url: u\n  name: b\n", "name", 3),
    ("a: 1\n'a': 2\n", "a", 2),
    ("d:\n  <<: {x: 1}\n  y: 2\n  y: 3\n", "y", 4),
])
def test_a_key_given_twice_names_it_and_its_line(text, key, line):
    assert isinstance(yaml.safe_load(text), (dict, list))  # PyYAML reads it, dropping a value
    with pytest.raises(DuplicateKeyError) as e:
        safe_load(text)
    assert (e.value.key, e.value.line) == (key, line)
    assert isinstance(e.value, yaml.YAMLError)  # callers' YAML error handling catches it
    assert str(e.value) == f"line {line}: key {key!r} given twice in one mapping (which one is meant? a YAML " \
                           "reader keeps the last and drops the other)"


def test_an_unhashable_key_is_refused_as_yaml_refuses_it():
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load("? [1, 2]\n: 3\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        safe_load("? [1, 2]\n: 3\n")


def test_a_syntax_error_names_the_file_it_is_given():
    """PyYAML names a text it is handed as a string `<unicode string>`: `in "<unicode string>", line 2,
    column 10`, where the config file's name was meant."""
    text = "train:\n  steps: [1\n"
    with pytest.raises(yaml.YAMLError) as unnamed:
        safe_load(text)
    assert 'in "<unicode string>", line 2, column 10' in str(unnamed.value)
    with pytest.raises(yaml.YAMLError) as named:
        safe_load(text, "runs/my.yaml")
    assert 'in "runs/my.yaml", line 2, column 10' in str(named.value) and "<unicode" not in str(named.value)
    assert safe_load("a: 1\n", "runs/my.yaml") == {"a": 1}
