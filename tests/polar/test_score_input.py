"""polar/score_input.py: the three line shapes of `polar score`, and bad lines named by file:line."""
from __future__ import annotations

import json

import pytest

from polar.records import RecordError
from polar.score_input import iter_score_input, output_row


def write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


BASE = {"prompt": "p", "reference": "r"}


def test_each_shape_gives_its_items_and_output_row(tmp_path):
    path = write(tmp_path / "in.jsonl", [{**BASE, "chosen": "a", "rejected": "b", "wrapper": "pretrain"},
                                         {**BASE, "candidates": ["x", {"text": "y", "id": 3}]},
                                         {**BASE, "output": "", "wrapper": None}])
    lines = list(iter_score_input(path))
    assert [ln.kind for ln in lines] == ["record", "group", "output"]
    assert [[i.output for i in ln.items] for ln in lines] == [["a", "b"], ["x", "y"], [""]]
    assert [ln.items[0].wrapper for ln in lines] == ["pretrain", "sft", "sft"]
    assert output_row(lines[0], [1.0, 2.0]) == {"line": 1, "rewards": [1.0, 2.0], "chosen_reward": 1.0,
                                                "rejected_reward": 2.0}
    assert output_row(lines[2], [0.5]) == {"line": 3, "rewards": [0.5], "reward": 0.5}


@pytest.mark.parametrize("extra,field,reason", [
    ({"output": "o", "wrapper": ""}, "wrapper", "must be one of"),  # only absent or null means sft
    ({"output": "o", "wrapper": 0}, "wrapper", "must be one of"),
    ({"candidates": ["x"], "output": "o"}, "output", "not candidates and output"),
    ({"chosen": "a", "rejected": "b", "candidates": ["x"]}, "candidates", "not chosen/rejected and candidates"),
    ({"candidates": []}, "candidates", "non-empty list"),
    ({}, "output", "missing"),
    # a misspelt field was reported only as `output: missing`, since other keys are metadata
    ({"candidate": ["x"], "id": 3}, "output", "missing (a line needs chosen/rejected, candidates or output); "
                                              "'candidate' given: is it 'candidates'?"),
    ({"ouput": "o"}, "output", "'ouput' given: is it 'output'?"),
    ({"outputs": ["x", "y"]}, "output", "'outputs' given: a list of outputs is given here as candidates"),
    # each output is scored against the reference: an empty one was scored (rc 0), where polar serve answers 400
    ({"reference": "", "output": "o"}, "reference", "the reference is empty: POLAR scores an output against"),
    ({"reference": " \n", "candidates": ["x"]}, "reference", "the reference is empty (only whitespace)"),
    ({"reference": [{"content": ""}, {"content": " "}], "chosen": "a", "rejected": "b"}, "reference",
     "(only whitespace)"),
])
def test_a_bad_line_is_named_or_kept_in_place(tmp_path, extra, field, reason):
    path = write(tmp_path / "in.jsonl", [{**BASE, "output": "fine"}, {**BASE, **extra}])
    with pytest.raises(RecordError) as e:
        list(iter_score_input(path))
    assert str(e.value).startswith(f"{path}:2: {field}: ") and reason in str(e.value), str(e.value)
    kept = list(iter_score_input(path, on_error="skip"))
    assert [ln.line for ln in kept] == [1, 2] and kept[1].kind == "error" and reason in kept[1].error


@pytest.mark.parametrize("extra,field", [
    ({"output": "o\udc80"}, "output"),
    ({"candidates": ["x", {"text": [{"role": "a", "content": "\ud800"}]}]}, "candidates[1].text[0].content"),
    ({"chosen": "a", "rejected": [{"content": "\udfff"}]}, "rejected[0].content"),
])
def test_a_lone_surrogate_is_a_bad_line_not_a_crash(tmp_path, extra, field):
    # JSON may escape one ("\udc80") but no tokenizer can encode it: `polar score` crashed with a
    # UnicodeEncodeError naming no line, even with --on-error skip, where `polar serve` answers 400
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({**BASE, "output": "fine"}) + "\n" + json.dumps({**BASE, **extra}) + "\n")
    with pytest.raises(RecordError) as e:
        list(iter_score_input(str(path)))
    assert str(e.value).startswith(f"{path}:2: {field}: lone surrogate"), str(e.value)
    kept = list(iter_score_input(str(path), on_error="skip"))
    assert [ln.kind for ln in kept] == ["output", "error"]


def test_a_line_that_is_not_an_object_is_named_as_every_record_reader_names_it(tmp_path):
    """It was `line: expected a JSON object`, where every other reader says `(record): must be ...`."""
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({**BASE, "output": "fine"}) + "\n[1, 2]\n")
    with pytest.raises(RecordError, match=rf"^{path}:2: \(record\): must be a JSON object, got list$"):
        list(iter_score_input(str(path)))
