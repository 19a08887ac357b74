from polar.build_repeats import SHOWN, first_of, named
from polar.finetune_split import where
from polar.records import Record


def test_the_first_few_are_joined_and_a_tail_says_more_were_not_shown():
    assert first_of([], 0) == ""
    assert first_of(["a"], 1) == "a"
    assert first_of(iter(["a", "b"]), 2) == "a, b"  # any iterable: the callers pass generators
    assert first_of(["a", "b"], 5) == "a, b, ..."
    assert named(2, [("x:2", "x:1"), ("x:4", "x:3")]) == "x:2 repeats x:1, x:4 repeats x:3"
    assert named(3, [("x:2", "x:1")]) == "x:2 repeats x:1, ..."


def test_where_names_the_first_records_by_file_and_line():
    records = [Record("p", "r", ["c", "d"], [1, 0], None, file="f.jsonl", line=i) for i in range(1, SHOWN + 2)]
    assert where(records[:SHOWN]) == ", ".join(f"f.jsonl:{i}" for i in range(1, SHOWN + 1))
    assert where(records) == where(records[:SHOWN]) + ", ..."
    assert where(records, limit=1) == "f.jsonl:1, ..."
    assert where([]) == ""
