"""`polar score` (engine/score.py) on a line of n rollouts that together pass the packed sequence
or the model's positions, each one short: the line is split into groups that fit (as `polar serve`
groups them), and every output's reward is the one it gets with the whole line in one group."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.engine.score_runs import in_one_process

ROOT = Path(__file__).parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
LINE = {"prompt": "What is 6*7? Show the steps.", "reference": "6*7 = 42, so the answer is 42.",
        # different lengths and prefixes among the outputs: the split shares what it can
        "candidates": [f"The answer is {i}. " + "x" * (i % 7) * 5 for i in range(24)]}


# Scoring only reads a checkpoint: the tests share one of each model, both made in one process (a
# process costs seconds of CPU before it builds the tiny model)
MADE = """
import sys

from tests.polar.serve.make_checkpoint import main

main(sys.argv[1])
main(sys.argv[2], *map(int, sys.argv[3:]))
"""

# off the 128 grid: a packed length rounded up to 128 (256) passes them
POSITIONS = 200


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    """The tiny model, and a dynamic-RoPE model (POLAR-7B's) within POSITIONS positions."""
    tmp = tmp_path_factory.mktemp("score_split")
    subprocess.run([sys.executable, "-c", MADE, str(tmp / "run"), str(tmp / "dynamic"),
                    *map(str, (2, 64, 4, 2, 176, 260, POSITIONS))], cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=600)
    return str(tmp / "run" / "checkpoints"), str(tmp / "dynamic" / "checkpoints")


@pytest.fixture(scope="module")
def checkpoint(checkpoints) -> str:
    return checkpoints[0]


@pytest.fixture(scope="module")
def dynamic_checkpoint(checkpoints) -> str:
    return checkpoints[1]


def _argv(tmp: Path, checkpoint: str, lines: list, name: str, *extra) -> list:
    """`polar score`'s arguments for `lines` (written to NAME.jsonl) and NAME_out.jsonl."""
    inp = tmp / f"{name}.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return ["score", "--checkpoint", checkpoint, "--input", str(inp), "--output", str(tmp / f"{name}_out.jsonl"),
            "--tokenizer", "byte", *extra]


def _with_rows(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    out = Path(proc.args[proc.args.index("--output") + 1])
    proc.rows = [json.loads(x) for x in out.read_text().splitlines()] if proc.returncode == 0 else None
    return proc


def _score(tmp: Path, checkpoint: str, lines: list, name: str, *extra) -> subprocess.CompletedProcess:
    """`polar score` in a process of its own."""
    proc = subprocess.run([sys.executable, "-m", "polar.cli", *_argv(tmp, checkpoint, lines, name, *extra)],
                          cwd=tmp, env=ENV, capture_output=True, text=True, timeout=600)
    proc.args = proc.args[3:]
    return _with_rows(proc)


def _one_group_tokens() -> tuple[int, int]:
    """The line's tokens as one group, and its longest output's."""
    from engine.score import lcp_group
    from polar.client_format import ScoringItem, client_encode_batch
    from polar.tokenizer import ByteTokenizer

    served = client_encode_batch(ByteTokenizer(), [ScoringItem(LINE["prompt"], LINE["reference"], c)
                                                   for c in LINE["candidates"]])
    return len(lcp_group([s.ids for s in served])), max(len(s.ids) for s in served)


SHORT = {"prompt": "p", "reference": "r", "output": "o"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint, dynamic_checkpoint) -> dict:
    """The tests' `polar score` runs at --nproc 1, one after another in one process
    (tests/engine/score_runs.py), each with its own input, output and messages in one folder: {name:
    the run's CompletedProcess, with .rows its output's rows where it succeeded}."""
    tmp = tmp_path_factory.mktemp("score_split_runs")
    too_long = {"prompt": "p", "reference": "r", "output": "y" * 400}
    made = {
        # --seq-length 256, --on-error skip: LINE (past 256 together, each output within it), a short
        # line, a line whose one output passes 256, the short line again
        "at_256": (checkpoint, [LINE, SHORT, dict(SHORT, output="y" * 400), SHORT], "--seq-length", "256",
                   "--on-error", "skip"),
        "one": (checkpoint, [LINE]),  # 16384 positions: the whole line in one group
        "fail": (checkpoint, [SHORT, too_long, SHORT], "--seq-length", "256"),
        # the client's truncation at lengths that cut (test_the_summary_counts_what_the_clients_truncation_cut)
        "cut": (checkpoint, [LINE], "--max-response-length", "24", "--max-length", "60"),
        "split": (dynamic_checkpoint, [LINE]),
        # each output on its own line: its reward alone
        "alone": (dynamic_checkpoint, [{"prompt": LINE["prompt"], "reference": LINE["reference"], "output": c}
                                       for c in LINE["candidates"]]),
        "settled": (dynamic_checkpoint, [SHORT, {"prompt": "😀" * 90, "reference": "é" * 90, "output": "y" * 400},
                                         SHORT]),
    }
    done = in_one_process(tmp, [{"argv": _argv(tmp, ckpt, lines, name, *extra), "cwd": tmp}
                                for name, (ckpt, lines, *extra) in made.items()], ENV)
    return {name: _with_rows(proc) for name, proc in zip(made, done)}


@pytest.fixture(scope="module")
def at_256(runs) -> subprocess.CompletedProcess:
    proc = runs["at_256"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_line_past_the_sequence_length_is_split_and_scores_as_one_group(runs, at_256):
    whole, longest = _one_group_tokens()
    assert longest < 256 < whole  # each output fits, the line does not
    one = runs["one"]  # 16384 positions: the whole line in one group
    assert one.returncode == 0, one.stderr[-3000:]
    # nothing is cut at the client's default lengths (the summary says so)
    assert "cut 0 output(s), 0 reference(s) and 0 prompt(s) of 24 item(s)" in one.stdout, one.stdout
    split = at_256
    assert "packed sequences of 256 tokens" in split.stdout
    assert [r["line"] for r in split.rows] == [1, 2, 3, 4] and len(split.rows[0]["rewards"]) == len(LINE["candidates"])
    np.testing.assert_allclose(split.rows[0]["rewards"], one.rows[0]["rewards"], rtol=0, atol=1e-5)
    assert np.ptp(one.rows[0]["rewards"]) > 1e-4  # the outputs' rewards differ: the order is checked


def test_a_line_past_the_models_positions_is_scored(runs):
    """A dynamic-RoPE model (POLAR-7B's) refuses any row past its positions: a line of short
    rollouts longer than them together was refused, while `polar serve` scored it. Its positions off
    the 128 grid, the packed length rounds up to 128 but never past them: a row of 256 was refused
    even when each group in it was shorter."""
    whole, longest = _one_group_tokens()
    assert 128 < longest < POSITIONS < whole
    split = runs["split"]
    assert split.returncode == 0, split.stderr[-3000:]
    assert f"packed sequences of {POSITIONS} tokens" in split.stdout, split.stdout  # not 256
    # each output on its own line: its reward alone
    alone = runs["alone"]
    assert alone.returncode == 0, alone.stderr[-3000:]
    np.testing.assert_allclose(split.rows[0]["rewards"], [r["reward"] for r in alone.rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("max_tokens", [40, 100, 257])
def test_split_groups_fit_and_cover_every_output_once(max_tokens):
    from engine.score import SplitLine, lcp_group, line_groups

    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 250, 30).astype(np.int32)
    ids = [np.concatenate([prefix, rng.integers(0, 250, int(rng.integers(1, 9))).astype(np.int32)])
           for _ in range(20)]
    line = line_groups(ids, max_tokens)
    if max_tokens >= len(lcp_group(ids)):
        assert not isinstance(line, SplitLine)
        return
    assert isinstance(line, SplitLine) and len(line) <= max_tokens
    assert sorted(m for members in line.members for m in members) == list(range(len(ids)))
    for group, members in zip(line.parts, line.members):
        for c, m in zip(group.candidates, members):
            assert np.array_equal(np.concatenate([group.prefix, c]), ids[m])


def test_a_line_whose_one_output_passes_the_sequence_length_is_an_error_line_under_skip(runs, at_256):
    """A prefix and one output longer than --seq-length cannot be split to fit: refused by file:line
    (exit 2) before the model loads, no row written, or under --on-error skip an error line while the
    others are scored (it stopped the whole run under skip too)."""
    refused = runs["fail"]  # SHORT, a line whose one output passes 256, SHORT
    assert refused.returncode == 2 and "fail.jsonl:2: an output takes" in refused.stderr, refused.stderr[-2000:]
    assert "loading" not in refused.stdout  # found before the model is loaded (minutes at 7B)
    # not a row, not even an empty partial output with its settings record, which a stop before the
    # first row left behind (polar/score_output.py, RowWriter.close)
    out = Path(refused.args[refused.args.index("--output") + 1])
    assert out.name == "fail_out.jsonl" and not out.exists()
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.partial.json").exists()
    skipped = at_256  # the same lines after LINE
    assert [r["line"] for r in skipped.rows] == [1, 2, 3, 4]
    # one output is too long, not the line's outputs together (which would be split and scored)
    assert skipped.rows[2]["error"].startswith("an output takes "), skipped.rows[2]
    assert "with its prompt and reference, more than --seq-length 256" in skipped.rows[2]["error"]
    assert skipped.rows[1]["reward"] == pytest.approx(skipped.rows[3]["reward"], abs=1e-5)  # the same line
    assert "1 line(s) longer than --seq-length 256, written as error lines" in skipped.stdout


def test_the_models_positions_settle_the_clients_lengths_before_it_loads(tmp_path, dynamic_checkpoint, runs,
                                                                           capsys):
    """The client's default lengths (16384, 4096) let an item pass the 200 positions, and a line
    past them stopped the run after the model had loaded: the defaults are now lowered to what the
    positions hold (said at start-up), so every line is scored; a --max-length whose items may pass
    them stops the run before the model is loaded, naming the largest that fits."""
    ckpt = dynamic_checkpoint
    scored = runs["settled"]  # SHORT, a line of 90 emoji, 90 é and 400 y, SHORT
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "--max-length 185 (not the client's 16384) and --max-response-length 89 (not 4096)" in scored.stdout
    assert [r["line"] for r in scored.rows] == [1, 2, 3] and all("reward" in r for r in scored.rows)
    assert "--max-length 185, --max-response-length 89) cut 1 output(s)" in scored.stdout
    from polar.cli import main

    # in this process (as `polar score` runs at --nproc 1): refused before any process group or model
    given = ["--max-length", "200", "--max-response-length", "80"]
    settled = scored.args[scored.args.index("--input") + 1]
    assert main(["score", "--checkpoint", ckpt, "--input", settled, "--output", str(tmp_path / "given.jsonl"),
                 "--tokenizer", "byte", *given]) == 2
    refused = capsys.readouterr()
    assert "the largest --max-length whose items fit is 185" in refused.err and "loading" not in refused.out
    # a response alone: counted on the positions' 185, not the client's 16384 (whose remedies they refuse)
    assert main(["score", "--checkpoint", ckpt, "--input", settled, "--output", str(tmp_path / "given.jsonl"),
                 "--tokenizer", "byte", "--max-response-length", "9000"]) == 2
    refused = capsys.readouterr()
    assert "allow --max-length 185 at most" in refused.err and "use --max-response-length <= 89" in refused.err
    assert ">= 18006" not in refused.err and "loading" not in refused.out, refused.err


def test_score_groups_maps_each_groups_rewards_back_to_its_line_and_outputs():
    """Plain and split lines mixed, packed for real (several sequences, collate's order): every reward
    lands on its own line and output, and a group past the sequence length is named by its line (the
    model stubbed: each candidate's reward is the id of its last token, unique here)."""
    from types import SimpleNamespace

    import torch

    from engine.config import ConfigError
    from engine.score import CheckpointScorer, SplitLine, lcp_group

    def ids(*xs):
        return [np.asarray(x, dtype=np.int32) for x in xs]

    plain = lcp_group(ids([1, 2, 3], [1, 2, 4, 5]))
    split = SplitLine([lcp_group(ids([1, 7, 7, 7], [1, 8, 8])), lcp_group(ids([1, 9]))], [[2, 0], [1]])
    single = lcp_group(ids([6, 6]))
    scorer = object.__new__(CheckpointScorer)
    scorer.model_cfg = SimpleNamespace(max_position_embeddings=64)
    scorer.tokenizer = SimpleNamespace(pad_id=0)
    seen = {}

    def last_token_ids(batches, progress, data_parallel):
        seen.update(sequences=len(batches), data_parallel=data_parallel)
        return torch.cat([torch.zeros(0)] + [b.tokens.flatten()[b.reward_index].float() for b in batches])

    scorer._rewards = last_token_ids
    # 8 tokens a sequence: groups of 5, 6, 2 and 2 tokens, in two sequences (best fit: 6 + 2, 5 + 2; input
    # order took three)
    rewards, facts = scorer.score_groups([plain, split, single], 8, where=lambda i: f"f.jsonl:{i + 1}")
    assert rewards == [[3.0, 5.0], [8.0, 9.0, 7.0], [6.0]]
    assert facts["sequences"] == seen["sequences"] == 2 and facts["outputs"] == 6 and facts["seq_length"] == 8
    assert facts["prefix_tokens_saved"] == 2 + 1  # [1, 2] once for two, [1] once for two
    assert scorer.score_groups([split, plain], 0, data_parallel=False)[0] == [[8.0, 9.0, 7.0], [3.0, 5.0]]
    assert seen["data_parallel"] is False
    assert scorer.score_groups([], 0)[0] == []
    with pytest.raises(ConfigError, match="^f.jsonl:2: an output takes 9 tokens with its prompt and reference, "
                                          "more than the packed sequence length 8$"):
        scorer.pack([plain, SplitLine([lcp_group(ids([1] * 9))], [[0]])], 8, where=lambda i: f"f.jsonl:{i + 1}")
    # a Group given whole (not split by line_groups) may hold several outputs
    with pytest.raises(ConfigError, match="^f.jsonl:1: its 2 outputs take 9 tokens together, more than the packed "
                                          "sequence length 8$"):
        scorer.pack([lcp_group(ids([1, 2, 3, 4, 5], [1, 6, 7, 8, 9]))], 8, where=lambda i: f"f.jsonl:{i + 1}")


def test_the_summary_counts_what_the_clients_truncation_cut(runs):
    """A reward read from an output cut to its head never saw its end: the summary says how many."""
    # byte ids: BOS + the text's bytes; the reference (31 ids) passes 24, the outputs from 24 ids on
    outputs_cut = sum(len(c.encode()) + 1 > 24 for c in LINE["candidates"])
    assert 0 < outputs_cut < len(LINE["candidates"])
    # the prompt's budget (60 - 4 - 24 - |output ids|) // 2 <= 16 ids: every prompt (29 ids) is cut
    proc = runs["cut"]  # LINE at --max-response-length 24 --max-length 60
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(LINE["candidates"])
    assert (f"the client's truncation (--max-length 60, --max-response-length 24) cut {outputs_cut} output(s), "
            f"{n} reference(s) and {n} prompt(s) of {n} item(s) of the input") in proc.stdout, proc.stdout


@pytest.mark.parametrize("max_tokens", [30, 45, 60, 200])
def test_a_line_fits_the_sequence_length_where_its_longest_output_does(max_tokens):
    """polar score's check before the model loads (polar/score_length_check.py) reads only each
    output's token count: a line's groups fit `max_tokens` exactly when its longest output does, and
    a line that does not takes that output's count (the number the scoring names)."""
    from engine.score import line_groups

    rng = np.random.default_rng(1)
    for _ in range(60):
        prefix = rng.integers(0, 250, int(rng.integers(1, 30))).astype(np.int32)
        ids = [np.concatenate([prefix[:int(rng.integers(1, len(prefix) + 1))],
                               rng.integers(0, 250, int(rng.integers(1, 40))).astype(np.int32)])
               for _ in range(int(rng.integers(1, 12)))]
        longest = max(len(x) for x in ids)
        line = len(line_groups(ids, max_tokens))
        assert (line > max_tokens) == (longest > max_tokens)
        if line > max_tokens:
            assert line == longest


# engine.score under torchrun, counting the items each rank tokenizes before the weights are read
COUNTED = """
import os
import sys

import engine.checkpoint_load
import polar.client_format
from engine.score import main

encode, load, items = polar.client_format.client_encode_batch, engine.checkpoint_load.load, [0]


def counted_encode(tokenizer, batch, **kw):
    items[0] += len(batch)
    return encode(tokenizer, batch, **kw)


def counted_load(*a, **kw):
    with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as f:
        f.write(str(items[0]))
    return load(*a, **kw)


polar.client_format.client_encode_batch, engine.checkpoint_load.load = counted_encode, counted_load
sys.exit(main(sys.argv[2:]))
"""


def test_two_ranks_share_the_check_before_the_load_and_stop_at_the_first_line_too_long(tmp_path, checkpoint):
    """With a --seq-length below what the client's truncation allows, every line is checked against
    it before the model is loaded. Each rank tokenized the whole input for that (and then its share
    again to score it): the input is now tokenized once over the ranks, each rank checking its share,
    and a line too long found by either rank stops both, naming the first such line, before loading."""
    short = {"prompt": "p", "reference": "r", "candidates": ["o", "oo"]}
    lines = [short] * 12
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    script = tmp_path / "counted.py"
    script.write_text(COUNTED)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "items"), "--checkpoint", checkpoint, "--input", str(inp),
                           "--output", str(tmp_path / "out.jsonl"), "--tokenizer", "byte", "--seq-length", "256"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before_load = [int((tmp_path / f"items.{rank}").read_text()) for rank in (0, 1)]
    assert sum(before_load) == 2 * len(lines), before_load  # was 24 on each rank

    # lines 1-6 are the first rank's share, 7-12 the second's: the first rank, which found none, and
    # the second stop alike, naming the second's first
    lines[7], lines[10] = dict(short, candidates=["o", "y" * 300]), dict(short, candidates=["y" * 400])
    from polar.client_format import ScoringItem, client_encode_batch
    from polar.tokenizer import ByteTokenizer

    tokens = len(client_encode_batch(ByteTokenizer(), [ScoringItem("p", "r", "y" * 300)])[0].ids)
    refused = _score(tmp_path, checkpoint, lines, "two", "--seq-length", "256", "--nproc", "2")
    assert refused.returncode != 0, refused.stderr[-3000:]  # torchrun's 1 for its workers' 2
    said = f"two.jsonl:8: an output takes {tokens} tokens with its prompt and reference, more than --seq-length 256"
    assert refused.stderr.count(said) == 1, refused.stderr[-3000:]
    assert "loading" not in refused.stdout and "two.jsonl:11" not in refused.stderr
