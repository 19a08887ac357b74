"""data.eval_path's several named evaluation sets (engine.setting_checks.named_datasets): how an entry is read,
and every refusal naming the setting and the entry."""
from __future__ import annotations

import pytest

from engine.setting_checks import ConfigError, named_dataset_paths_or_empty, named_datasets


def test_one_path_is_the_set_eval_and_named_entries_keep_their_order(tmp_path):
    assert named_datasets("data.eval_path", "") == []
    assert named_datasets("data.eval_path", "ds_eval/") == [("eval", "ds_eval/")]
    assert named_datasets("data.eval_path", "chat=ds/chat, base-7b=ds/base") == [("chat", "ds/chat"),
                                                                                ("base-7b", "ds/base")]
    assert named_datasets("data.eval_path", "only=ds/x") == [("only", "ds/x")]
    # a path that exists is a path, "=" in its name or not: a setting that worked before still does
    odd = tmp_path / "run=3"
    odd.mkdir()
    assert named_datasets("data.eval_path", str(odd)) == [("eval", str(odd))]
    assert named_datasets("data.eval_path", f"a={odd}") == [("a", str(odd))]
    # before "=" no name (a "/"): the whole entry is a path
    assert named_datasets("data.eval_path", "/data/x=1") == [("eval", "/data/x=1")]


@pytest.mark.parametrize("value, said", [
    ("a=ds/a,ds/b", "several evaluation sets need a name each, NAME=PATH,NAME=PATH (ds/b has none"),
    ("ds/a,ds/b", "(ds/a has none"),
    ("a=ds/a,a=ds/b", "the set name a is given twice"),
    ("a=ds/a,", "an empty entry"),
    ("a=ds/a,,b=ds/b", "an empty entry"),
])
def test_refusals_name_the_setting_and_the_entry(value, said):
    with pytest.raises(ConfigError) as e:
        named_datasets("data.eval_path", value)
    assert str(e.value).startswith(f"data.eval_path={value}: ") and said in str(e.value), str(e.value)


def test_every_set_must_exist_and_the_message_names_the_missing_one(tmp_path):
    (tmp_path / "a").mkdir()
    named_dataset_paths_or_empty("data.eval_path", f"a={tmp_path / 'a'}")
    value = f"a={tmp_path / 'a'},b={tmp_path / 'b'}"
    with pytest.raises(ConfigError) as e:
        named_dataset_paths_or_empty("data.eval_path", value)
    assert str(e.value).startswith(f"data.eval_path={value}: set b: {tmp_path / 'b'}: no such dataset directory"), \
        str(e.value)
    # one set by its path alone: the message as before (as for data.path)
    with pytest.raises(ConfigError) as e:
        named_dataset_paths_or_empty("data.eval_path", str(tmp_path / "b"))
    assert str(e.value).startswith(f"data.eval_path={tmp_path / 'b'}: no such dataset directory"), str(e.value)


def test_a_yaml_mapping_of_names_to_paths_reads_as_the_named_form(tmp_path):
    """In a config file the sets may be a mapping ({held_out: ds/ho, seen: ds/seen}); a bad name or path is named
    with the file and line that gave it."""
    from engine.config_load import load_config
    from polar.pretrain_recipe import PretrainConfig

    for name in ("ho", "se"):
        (tmp_path / name).mkdir()
    f = tmp_path / "run.yaml"
    f.write_text(f"data:\n  eval_path:\n    held_out: {tmp_path / 'ho'}\n    seen: {tmp_path / 'se'}\n")
    cfg = load_config(PretrainConfig, str(f))
    assert cfg.data.eval_path == f"held_out={tmp_path / 'ho'},seen={tmp_path / 'se'}"
    assert named_datasets("data.eval_path", cfg.data.eval_path) == [("held_out", str(tmp_path / "ho")),
                                                                    ("seen", str(tmp_path / "se"))]
    for body, said in ((f"    held out: {tmp_path / 'ho'}\n", "the set name 'held out' is not letters, digits"),
                       ("    held_out: 3\n", "set held_out: expected a dataset's path (without a comma), got 3"),
                       ("    held_out: a,b\n", "set held_out: expected a dataset's path (without a comma), got 'a,b'"),
                       (f"    held_out: {tmp_path / 'nothing'}\n", "set held_out: ")):
        f.write_text("data:\n  eval_path:\n" + body)
        with pytest.raises(ConfigError) as e:
            load_config(PretrainConfig, str(f))
        assert str(e.value).startswith(f"{f}:") and "data.eval_path" in str(e.value) and said in str(e.value), \
            str(e.value)
