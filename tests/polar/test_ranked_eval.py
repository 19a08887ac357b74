import io
import json
import math

import pytest

from polar.client_format import ScoringItem
from polar.ranked_eval import (evaluate_ranked, format_table, parse_ranked_line, read_ranked,
                               scoring_items, write_result)
from polar.records import RecordError


def write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return str(path)


# Hand-made ranked data. Rewards are given by text: reward = REWARDS[text].
RECORDS = [
    # math: ranks 1 (ref), 2, 3, 4 -> pairs (2>3), (2>4), (3>4)
    {"prompt": "2+2?", "category": "math", "responses": [
        {"text": "4", "rank": 1}, {"text": "four", "rank": 2}, {"text": "5", "rank": 4},
        {"text": "4.0?", "rank": 3}]},
    # math, best-first list: ranks 1, 2, 3 -> pair (2>3)
    {"prompt": "3+3?", "category": "math", "responses": ["6", "six", "7"]},
    # writing: ranks 1, 2, 2, 3 -> pairs (a>c), (b>c); a and b tie in rank: no pair
    {"prompt": [{"role": "user", "content": "a poem"}], "category": "writing",
     "wrapper": "pretrain", "responses": [
         {"text": "ref poem", "rank": 1}, {"text": "a", "rank": 2}, {"text": "b", "rank": 2},
         {"text": "c", "rank": 3}]},
    # no category; ranks 1, 3, 5 (gaps) -> pair (x>y)
    {"prompt": "q", "responses": [{"text": "y", "rank": 5}, {"text": "r", "rank": 1},
                                  {"text": "x", "rank": 3}]},
]
REWARDS = {"four": 1.0, "5": -3.0, "4.0?": 2.0,  # math 1: 2>3 wrong, 2>4 right, 3>4 right
           "six": 0.5, "7": 0.5,                  # math 2: tie -> wrong
           "a": -1.0, "b": 3.0, "c": 0.0,         # writing: a>c wrong, b>c right
           "x": 2.0, "y": 1.0}                    # uncategorized: right


def score_by_text(items):
    return [REWARDS[it.output] for it in items]


@pytest.fixture
def records(tmp_path):
    return read_ranked(write(tmp_path / "ranked.jsonl", RECORDS[:2] + [""] + RECORDS[2:]))


def test_hand_computed_accuracies(records):
    result = evaluate_ranked(records, score_by_text)
    assert result["overall"] == {"accuracy": 4 / 7, "correct": 4, "pairs": 7, "ties": 1, "records": 4}
    cats = result["categories"]
    assert cats["math"] == {"accuracy": 2 / 4, "correct": 2, "pairs": 4, "ties": 1, "records": 2}
    assert cats["writing"] == {"accuracy": 1 / 2, "correct": 1, "pairs": 2, "ties": 0, "records": 1}
    assert cats["uncategorized"]["accuracy"] == 1.0
    assert result["category_mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert result["scored_inputs"] == 3 + 2 + 3 + 2


def test_each_needed_response_is_scored_once_as_a_structured_input(records):
    items, index = scoring_items(records)
    assert items[0] == ScoringItem("2+2?", "4", "four", "sft")
    assert [it.output for it in items] == ["four", "5", "4.0?", "six", "7", "a", "b", "c", "y", "x"]
    writing = items[5]
    assert writing.prompt == [{"role": "user", "content": "a poem"}]
    assert (writing.reference, writing.wrapper) == ("ref poem", "pretrain")
    assert index[3] == [8, 9]  # "y" then "x", in the record's order
    # a response whose rank is shared by every other one below the reference is in no pair
    rec = parse_ranked_line(json.dumps({"prompt": "p", "responses": [
        {"text": "r", "rank": 1}, {"text": "u", "rank": 2}, {"text": "v", "rank": 3},
        {"text": "w", "rank": 3}]}).encode(), "f", 1)
    assert rec.pairs() == [(0, 1), (0, 2)]


def test_the_scoring_items_a_caller_made_are_the_ones_scored(records):
    """polar eval maps each item to its record line with scoring_items, which evaluate_ranked made a
    second time: given the caller's, it scores those very items, with the same result."""
    scored = scoring_items(records)
    seen = []

    def score(items):
        seen.append(items)
        return score_by_text(items)

    assert evaluate_ranked(records, score, scored) == evaluate_ranked(records, score_by_text)
    assert seen[0] is scored[0]


def test_reversing_the_rewards_flips_every_untied_pair(records):
    result = evaluate_ranked(records, lambda items: [-REWARDS[it.output] for it in items])
    assert result["overall"]["correct"] == 7 - 4 - 1


def test_table_and_json(records, tmp_path):
    result = evaluate_ranked(records, score_by_text)
    table = format_table(result)
    assert "math" in table and "57.14%" in table and "category mean" in table
    assert table.splitlines()[0].split() == ["category", "accuracy", "pairs", "correct", "ties", "records"]
    out = tmp_path / "r.json"
    write_result(result, str(out))
    assert json.loads(out.read_text())["categories"]["writing"]["accuracy"] == 0.5
    empty = evaluate_ranked([], score_by_text)
    assert math.isnan(empty["overall"]["accuracy"])
    write_result(empty, str(out))
    assert json.loads(out.read_text())["overall"]["accuracy"] is None



def test_a_category_holding_a_tab_or_a_newline_stays_one_cell_of_one_row():
    result = evaluate_ranked([parse_ranked_line(json.dumps({"prompt": "p", "category": c, "responses": ["r", "a", "b"]})
                                                .encode(), "f.jsonl", i + 1) for i, c in enumerate(("a\tb", "x\ny"))],
                             score_by_text)
    lines = format_table(result).splitlines()
    assert len(lines) == 1 + 2 + 2 + 1  # header, the two categories, separator and overall, category mean
    assert lines[1].startswith("a\\tb ") and lines[2].startswith("x\\ny ")
    assert len({len(line) for line in lines[:3]}) == 1  # aligned

def test_score_fn_contract(records):
    with pytest.raises(ValueError, match="returned 1 rewards for 10 inputs"):
        evaluate_ranked(records, lambda items: [0.0])
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_ranked(records, lambda items: [float("nan")] * len(items))


@pytest.mark.parametrize("obj, field, reason", [
    ({"responses": ["a", "b", "c"]}, "prompt", "missing"),
    ({"prompt": "p"}, "responses", "missing"),
    ({"prompt": "p", "responses": "abc"}, "responses", "must be a list"),
    ({"prompt": "p", "responses": ["a", "b"]}, "responses", "no pair"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2},
                                   {"text": "c", "rank": 2}]}, "responses", "no pair"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 2}, {"text": "b", "rank": 3},
                                   {"text": "c", "rank": 4}]}, "responses", "exactly one"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 1},
                                   {"text": "c", "rank": 2}]}, "responses", "exactly one"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b"}, {"text": "c", "rank": 3}]},
     "responses[1].rank", "missing"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 0}, "c"]},
     "responses", "mixes"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b", "rank": 2.0},
                                   {"text": "c", "rank": 3}]}, "responses[1].rank", "integer >= 1"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": 3, "rank": 2},
                                   {"text": "c", "rank": 3}]}, "responses[1].text", "must be a string"),
    ({"prompt": "p", "responses": ["a", [{"role": "x"}], "c"]}, "responses[1][0].content", "missing"),
    ({"prompt": "p", "category": 3, "responses": ["a", "b", "c"]}, "category", "non-empty string"),
    ({"prompt": "p", "wrapper": "chat", "responses": ["a", "b", "c"]}, "wrapper", "one of"),
    ({"prompt": "p", "wrapper": "", "responses": ["a", "b", "c"]}, "wrapper", "one of"),  # not the default
    (["not", "an", "object"], "(record)", "JSON object"),
    ({"prompt": None, "responses": ["a", "b", "c"]}, "prompt", "missing (or null)"),
    # lone surrogates (legal JSON escapes, no characters): found at scoring, they were a traceback,
    # and in a category one that came after every record was scored, so no result was written
    ({"prompt": "p\ud800", "responses": ["a", "b", "c"]}, "prompt", "lone surrogate U+D800 at character 1"),
    ({"prompt": "p", "responses": ["a", "b", "\udc80"]}, "responses[2]", "lone surrogate U+DC80"),
    ({"prompt": "p", "responses": [{"text": "a", "rank": 1}, {"text": "b\udfff", "rank": 2},
                                   {"text": "c", "rank": 3}]}, "responses[1].text", "lone surrogate U+DFFF"),
    ({"prompt": [{"content": "\ud800"}], "responses": ["a", "b", "c"]}, "prompt[0].content", "lone surrogate"),
    ({"prompt": "p", "category": "m\ud800", "responses": ["a", "b", "c"]}, "category", "lone surrogate"),
    # the names of the table's summary rows: such a category read as a second "overall" row, under
    # a separator line of its own
    ({"prompt": "p", "category": "overall", "responses": ["a", "b", "c"]}, "category",
     "'overall' is a summary row of polar eval's table ('overall', 'category mean'); rename the category"),
    ({"prompt": "p", "category": "category mean", "responses": ["a", "b", "c"]}, "category", "is a summary row"),
    ({"prompt": "p", "category": " Overall", "responses": ["a", "b", "c"]}, "category", "is a summary row"),
    # an empty reference: every reward compares with it, so the accuracy would measure nothing
    ({"prompt": "p", "responses": ["", "b", "c"]}, "responses[0]", "the reference) is empty"),
    ({"prompt": "p", "responses": [{"text": "b", "rank": 2}, {"text": [{"content": ""}], "rank": 1},
                                   {"text": "c", "rank": 3}]}, "responses[1].text", "the reference) is empty"),
    # only whitespace compares with nothing as well (it was scored)
    ({"prompt": "p", "responses": ["  ", "b", "c"]}, "responses[0]", "the reference) is empty (only whitespace)"),
    ({"prompt": "p", "responses": [{"text": [{"content": "\n"}], "rank": 1}, {"text": "b", "rank": 2},
                                   {"text": "c", "rank": 3}]}, "responses[0].text", "(only whitespace)"),
    # a key twice: JSON readers keep the last one without a word
    ('{"prompt": "p", "responses": ["a", "b", "c"], "prompt": "q"}', "prompt", "given twice in one object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, obj, field, reason):
    path = write(tmp_path / "bad.jsonl", [RECORDS[0], obj])
    with pytest.raises(RecordError) as e:
        read_ranked(path)
    assert str(e.value).startswith(f"{path}:2: {field}: ")
    assert reason in e.value.reason


def test_an_empty_response_below_the_reference_is_scored(tmp_path):
    """An empty answer is a candidate like any other (a policy may give one); only the reference,
    which every reward compares with, must hold text."""
    (rec,) = read_ranked(write(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["ref", "", [{"content": ""}]]}]))
    assert rec.reference == "ref" and rec.responses == ["", [{"content": ""}]] and rec.pairs() == [(0, 1)]
    items, index = scoring_items([rec])
    assert [it.output for it in items] == [""] and index == [[0, 0]]  # the message list joins to the same ""


def test_bad_json_and_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"{nope\n")
    with pytest.raises(RecordError, match=r"x.jsonl:1: \(line\): not valid JSON"):
        read_ranked(str(p))
    p.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(RecordError, match="invalid UTF-8"):
        read_ranked(str(p))


def test_evaluate_file_prints_and_writes(tmp_path, capsys):
    from polar.ranked_eval import evaluate_file

    path = write(tmp_path / "ranked.jsonl", RECORDS)
    result = evaluate_file(path, score_by_text, json_path=str(tmp_path / "out.json"))
    assert result["overall"]["accuracy"] == 4 / 7
    assert "57.14%" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["overall"]["pairs"] == 7


def test_a_response_repeated_at_two_ranks_is_scored_once_and_ties(tmp_path):
    """A scorer's reward for one text may differ in its last bits with where the text lies (a pack
    whose float sums run in another order, as in polar serve or an in-process scorer): two copies
    of a response scored as two inputs counted their pair right or wrong by that rounding, where
    the rule makes it a tie. A message list is the same response as its joined text."""
    from polar.format import as_text
    from polar.ranked_eval import evaluate_file

    path = write(tmp_path / "r.jsonl", [{"prompt": "Name a colour.", "responses": [
        "red", "blue", "green", [{"role": "assistant", "content": "blue"}], "green"]}])
    given = []

    def by_place(items):  # each input 1e-7 below the one before it, as a layout may give
        given.extend(as_text(it.output) for it in items)
        return [{"blue": 1.0, "green": 0.5}[as_text(it.output)] - 1e-7 * i for i, it in enumerate(items)]

    result = evaluate_file(path, by_place, out=io.StringIO())
    assert given == ["blue", "green"] and result["scored_inputs"] == 2
    # blue over green twice, green over blue once (wrong), each repeated text over itself (two ties)
    assert result["overall"] == {"accuracy": 3 / 6, "correct": 3, "pairs": 6, "ties": 2, "records": 1}


def test_thousands_of_responses_in_one_record_count_as_the_pairs_do(tmp_path, monkeypatch):
    import random

    from polar.ranked_eval import RankedRecord

    rng = random.Random(0)
    n = 3000  # best-of-n samples of one prompt: 4.5M pairs, which took minutes as a list
    resp = [{"text": "ref", "rank": 1}] + [{"text": f"x{i}", "rank": rng.randint(2, 40)} for i in range(n)]
    resp[5]["rank"] = 10 ** 30  # past int64
    reward = {f"x{i}": float(rng.randint(0, 20)) for i in range(n)}  # many tied rewards
    rec = read_ranked(write(tmp_path / "big.jsonl", [{"prompt": "p", "responses": resp}]))[0]
    # counted without listing the n^2 / 2 pairs (a timing here would be a benchmark's job)
    monkeypatch.setattr(RankedRecord, "pairs", lambda self: pytest.fail("the pairs were listed"))
    out = evaluate_ranked([rec], lambda items: [reward[it.output] for it in items])["overall"]
    monkeypatch.undo()
    small = rec.responses[:300], rec.ranks[:300]  # brute force over pairs() where that is quick
    rec.responses, rec.ranks = small
    got = evaluate_ranked([rec], lambda items: [reward[it.output] for it in items])["overall"]
    pairs = rec.pairs()
    assert got["pairs"] == len(pairs) and out["pairs"] > 4_000_000
    assert got["correct"] == sum(reward[small[0][i]] > reward[small[0][j]] for i, j in pairs)
    assert got["ties"] == sum(reward[small[0][i]] == reward[small[0][j]] for i, j in pairs)
