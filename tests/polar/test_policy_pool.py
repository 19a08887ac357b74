"""polar sample's policy pool file (polar/policy_pool.py): entries and fields it refuses, named."""
import pytest
import yaml

from polar import sample
from polar.policy_pool import PoolError, load_pool


@pytest.mark.parametrize("entries, expected", [
    ([{"base_url": "http://h:1/v1"}, {"base_url": "http://h:1/v1", "model": "m"}],
     "entry 0: field 'model' is required"),
    ([{"model": "a", "base_url": "http://h/v1", "temprature": 1}, {"model": "b", "base_url": "http://h/v1"}],
     "entry 0 ('a'): unknown field(s) temprature"),
    ([{"model": "a", "base_url": "http://h/v1"}, {"model": "b", "base_url": "http://h/v1", "kind": "chats"}],
     "entry 1 ('b'): field 'kind' must be one of"),
    ([{"model": "a", "base_url": "h:8000"}, {"model": "b", "base_url": "http://h/v1"}], "field 'base_url' must be"),
    ([{"model": "a", "base_url": "http://h/v1", "max_concurrency": 0}, {"model": "b", "base_url": "http://h/v1"}],
     "field 'max_concurrency' must be a positive integer"),
    ([{"model": "a", "base_url": "http://h/v1"}, {"model": "a", "base_url": "http://g/v1"}],
     "entry 1 ('a'): field 'name' 'a' repeats entry 0"),
    ([{"model": "a", "base_url": "http://h/v1", "api_key_env": "POLAR_TEST_SURELY_UNSET"},
      {"model": "b", "base_url": "http://h/v1"}], "'POLAR_TEST_SURELY_UNSET', which is not set"),
    ([{"model": "a", "base_url": "http://h/v1"}], "at least 2 policies"),
    ({"model": "a"}, "expected a YAML list"),
    (["just a string", {"model": "b", "base_url": "http://h/v1"}], "entry 0: expected a mapping"),
])
def test_bad_pool_yaml_names_entry_and_field(tmp_path, capsys, entries, expected):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump(entries))
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    rc = sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o.jsonl"),
                      "--num-prompts", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and str(pool) in err, err


def test_a_pool_key_variable_that_is_set_but_empty_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("POLAR_TEST_EMPTY_KEY", " ")  # no key was sent: a server wanting one refused every request
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump([{"model": "a", "base_url": "http://h/v1", "api_key_env": "POLAR_TEST_EMPTY_KEY"},
                                    {"model": "b", "base_url": "http://h/v1"}]))
    with pytest.raises(PoolError, match=r"pool.yaml:1: entry 0 \('a'\): field 'api_key_env' names "
                                        r"'POLAR_TEST_EMPTY_KEY', which is set but empty"):
        load_pool(str(pool))


def test_pool_yaml_syntax_error(tmp_path, capsys):
    pool = tmp_path / "pool.yaml"
    pool.write_text("- model: [a\n")
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    assert sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o"),
                        "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    # the position names the file (it was `in "<unicode string>", line 1, column 12`)
    assert "not valid YAML" in err and f'in "{pool}", line 1, column' in err and "<unicode" not in err, err


def test_pool_yaml_with_a_key_given_twice_is_refused(tmp_path, capsys):
    """PyYAML keeps the last value: an entry with two `model:` keys would query one model silently."""
    pool = tmp_path / "pool.yaml"
    pool.write_text("- name: a\n  base_url: http://127.0.0.1:1/v1\n  model: m1\n  model: m2\n"
                    "- name: b\n  base_url: http://127.0.0.1:1/v1\n  model: m3\n")
    corpus = tmp_path / "c.txt"
    corpus.write_text("doc\n")
    assert sample.main(["--corpus", str(corpus), "--pool", str(pool), "--output", str(tmp_path / "o"),
                        "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{pool}: not valid YAML: line 4: key 'model' given twice in one mapping" in err, err


def test_a_pool_under_a_policies_key_may_sit_beside_other_settings(tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"policies": [{"model": m, "base_url": "http://h:1/v1"} for m in "ab"],
                                    "notes": "sampling run 3"}))
    assert [p.name for p in load_pool(str(pool))] == ["a", "b"]
