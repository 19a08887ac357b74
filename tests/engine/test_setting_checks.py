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
