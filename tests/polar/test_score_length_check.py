"""polar/score_length_check.py: `polar score`'s check before the model loads that every line's outputs
fit --seq-length, each rank taking its share of the lines. The client's real ids (byte tokenizer), no
model: what the check needs from the scorer is its encode."""
from __future__ import annotations

import json
from array import array

import pytest

from engine.config import ConfigError
from polar.client_format import ScoringItem, client_encode_batch
from polar.client_limits import overrun
from polar.score_input import survey_score_input
from polar.score_length_check import first_in_share, first_too_long, share
from polar.tokenizer import ByteTokenizer

TOK, MAX_LENGTH, MAX_RESPONSE = ByteTokenizer(), 200, 97
SHORT = {"prompt": "p", "reference": "r", "candidates": ["o", "oo"]}


def encode(item_lists):
    """The client's ids of each item, per list: what CheckpointScorer.encoded gives."""
    return [[s.ids for s in client_encode_batch(TOK, items, max_length=MAX_LENGTH, max_response_length=MAX_RESPONSE)]
            for items in item_lists]


def long_line(n: int) -> dict:
    return dict(SHORT, candidates=["o", "y" * n])


def tokens(n: int) -> int:
    return len(encode([[ScoringItem("p", "r", "y" * n)]])[0][0])


def write_input(tmp_path, lines: dict) -> tuple[str, array]:
    """Lines 1-14 (`lines` replacing some), with blank lines between some: line numbers with gaps."""
    path = tmp_path / "in.jsonl"
    rows = [json.dumps(lines.get(i, SHORT)) + ("\n\n" if i % 4 == 0 else "\n") for i in range(1, 15)]
    path.write_text("".join(rows))
    return str(path), survey_score_input(str(path))[0]


def test_the_ranks_shares_of_the_check_cover_every_line_once():
    """Each rank checks the lines between its share's bounds (polar.score_length_check.share): line
    numbers with gaps (blank lines) and a resumed run's rest, over more ranks than lines too."""
    numbers = array("q", [2, 3, 5, 9, 10, 14, 15])
    for rest in (numbers, numbers[3:]):
        for world in range(1, 10):
            spans = [share(rest, rank, world) for rank in range(world)]
            covered = [n for span in spans if span for n in rest if span[0] < n <= span[1]]
            assert covered == list(rest), (world, spans)
            assert all(span is None or span[0] < span[1] for span in spans)


@pytest.mark.parametrize("chunk_lines", [1, 3, 100])
def test_the_earliest_of_the_ranks_finds_is_the_first_line_too_long(tmp_path, chunk_lines):
    """Two lines too long, the first named with its longest output's token count, whichever split
    of the lines over the ranks found them."""
    path, numbers = write_input(tmp_path, {9: long_line(80), 12: long_line(90)})
    want = (numbers[8], tokens(80))
    assert want[1] > 64
    for world in range(1, 6):
        found = [first_in_share(encode, path, 64, span, chunk_lines)
                 for span in (share(numbers, rank, world) for rank in range(world)) if span]
        assert min((f for f in found if f is not None), default=None) == want, (world, found)
    # a line of exactly the bound fits it
    whole = share(numbers, 0, 1)
    assert first_in_share(encode, path, tokens(80) - 1, whole, chunk_lines) == want
    assert first_in_share(encode, path, tokens(80), whole, chunk_lines) == (numbers[11], tokens(90))
    assert first_in_share(encode, path, tokens(90), whole, chunk_lines) is None


def test_a_line_too_long_stops_the_run_naming_it_and_the_bound(tmp_path):
    path, numbers = write_input(tmp_path, {5: long_line(80)})
    with pytest.raises(ConfigError) as e:
        first_too_long(encode, TOK, MAX_LENGTH, path, numbers, 64, "--seq-length 64", 4)
    assert str(e.value) == (f"{path}:{numbers[4]}: an output takes {tokens(80)} tokens with its prompt and reference, "
                            "more than --seq-length 64 (--on-error skip writes an error line instead)")
    # a resumed run checks only the lines it has not scored
    first_too_long(encode, TOK, MAX_LENGTH, path, numbers[5:], 64, "--seq-length 64", 4)


def test_each_rank_reads_its_share_and_all_stop_at_the_earliest_find(tmp_path):
    """Rank 0 of 2 (lines 1-7) finds nothing, rank 1 finds line 12: agree() hands both the earliest
    of the finds, and both stop with it."""
    path, numbers = write_input(tmp_path, {12: long_line(80)})
    finds = []

    def agree(found):
        finds.append(found)
        return min((f for f in finds if f is not None), default=None) if len(finds) == 2 else None

    first_too_long(encode, TOK, MAX_LENGTH, path, numbers, 64, "--seq-length 64", 4, rank=0, world=2, agree=agree)
    with pytest.raises(ConfigError, match=f"in.jsonl:{numbers[11]}: an output takes {tokens(80)} tokens"):
        first_too_long(encode, TOK, MAX_LENGTH, path, numbers, 64, "--seq-length 64", 4, rank=1, world=2,
                       agree=agree)
    assert finds == [None, (numbers[11], tokens(80))]


def test_no_line_is_tokenized_where_the_clients_truncation_fits_the_bound(tmp_path):
    """The client's truncation keeps every item within --max-length + the tokenizer's overrun: a
    bound at least that needs no pass over the input (its lines are tokenized where they are scored)."""
    path, numbers = write_input(tmp_path, {5: long_line(80)})
    calls = []

    def counted(item_lists):
        calls.append(len(item_lists))
        return encode(item_lists)

    bound = MAX_LENGTH + overrun(TOK)
    first_too_long(counted, TOK, MAX_LENGTH, path, numbers, bound, f"--seq-length {bound}", 4)
    assert calls == []
    first_too_long(counted, TOK, MAX_LENGTH, path, numbers, bound - 1, f"--seq-length {bound - 1}", 4)
    assert sum(calls) == len(numbers)  # one below it: every line tokenized, 4 at a time
