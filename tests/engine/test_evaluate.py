"""`polar eval` (engine/evaluate.py): --seq-length splits a record whose responses together pass
it (as `polar score` does), and bad arguments stop before any scoring with one message, exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.engine import entry_runs

RECORDS = [{"prompt": "Name a prime.", "category": "small", "responses": ["7", "8", "9"]},
           {"prompt": "Count to ten.", "category": "big",  # 12 responses: past 128 tokens together
            "responses": [" ".join(str(k) for k in range(1, 11 - i % 4)) + "." * i for i in range(12)]},
           # the same text at two ranks, twice: a tie each (one given as a message list)
           {"prompt": "Name a colour.", "category": "small",
            "responses": ["red", "blue", "green", [{"role": "assistant", "content": "blue"}], "green"]}]


def made_checkpoint(argv: list) -> int:
    """tests/polar/serve/make_checkpoint.py's run directory argv[0], its sizes argv[1:]."""
    from tests.polar.serve import make_checkpoint

    make_checkpoint.main(argv[0], *[int(a) for a in argv[1:]])
    return 0


def recorded_eval(argv: list) -> int:
    """`polar eval` (argv[1:]) whose scored rewards are also written to the JSON file argv[0]: the result
    holds only the accuracy, which a small change of every reward leaves as it is."""
    import polar.ranked_eval
    from polar import cli

    real = polar.ranked_eval.evaluate_ranked

    def recorded(records, score_fn, *given):
        def scored(items):
            rewards = score_fn(items)
            with open(argv[0], "w") as f:
                json.dump([float(r) for r in rewards], f)
            return rewards
        return real(records, scored, *given)

    polar.ranked_eval.evaluate_ranked = recorded
    try:
        return cli.main(argv[1:])
    finally:
        polar.ranked_eval.evaluate_ranked = real


def _argv(folder: Path, checkpoint: str, records: list, *extra) -> list:
    """`polar eval`'s arguments on `records` (written to folder/ranked.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    inp = folder / "ranked.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return ["eval", "--checkpoint", checkpoint, "--input", str(inp), "--tokenizer", "byte", *extra]


# a record too long for --seq-length 64 (records were found by their prompt object: two with the same
# one-character prompt, one string object in CPython, were merged and an error named the later record's line)
LONG = [{"prompt": "a", "responses": ["r", "y" * 400, "w"]}, {"prompt": "a", "responses": ["r", "z", "v"]}]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The checkpoint, then the `polar eval` runs the tests read, in turn in one process
    (tests/engine/entry_runs.py: starting python, torch and megatron is most of a run's time; each run
    starts and ends its own process group): -> (the checkpoint, the folder, {run: CompletedProcess}),
    each run's rewards in the folder's NAME_rewards.json."""
    tmp = tmp_path_factory.mktemp("eval")
    checkpoint = str(tmp / "run" / "checkpoints")
    runs = [("whole", _argv(tmp / "whole", checkpoint, RECORDS, "--json", str(tmp / "whole.json"))),
            ("split", _argv(tmp / "split", checkpoint, RECORDS, "--seq-length", "128",
                            "--json", str(tmp / "out" / "split.json"))),
            # the client's lengths are settled to what the model's 256 positions hold: --seq-length is what
            # it passes
            ("long", _argv(tmp / "long", checkpoint, LONG, "--seq-length", "64"))]
    # dynamic RoPE, 256 positions (POLAR-7B's kind)
    done = entry_runs.launch(tmp, [entry_runs.run("checkpoint", f"{__name__}:made_checkpoint", tmp / "run", 2, 64, 4,
                                                  2, 176, 260, 256, cwd=tmp),
                                   *[entry_runs.run(name, f"{__name__}:recorded_eval", tmp / f"{name}_rewards.json",
                                                    *argv, cwd=tmp) for name, argv in runs]], "eval")
    assert done["checkpoint"].returncode == 0, done["checkpoint"].stderr[-3000:]
    return checkpoint, tmp, done


@pytest.fixture(scope="module")
def checkpoint(evaluated):
    return evaluated[0]


def test_seq_length_splits_a_record_and_keeps_its_rewards(evaluated):
    tmp_path, runs = evaluated[1], evaluated[2]
    whole, split = runs["whole"], runs["split"]
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert split.returncode == 0, split.stderr[-3000:]  # it stopped at the big record's line before
    a, b = (json.loads((tmp_path / p).read_text()) for p in ("whole.json", "out/split.json"))
    assert a["overall"] == b["overall"] and a["overall"]["pairs"] == 1 + 55 + 6  # the first response is the reference
    # a response repeated below the reference is scored once: two copies in one group got rewards 1e-7
    # apart (other places in the pack), so these two ties were counted as none, right or wrong by the
    # layout (the whole and the split run disagreed: accuracy 0.855 and 0.871)
    assert a["overall"]["ties"] == 2, a
    # every response's reward, not only the pairs' order: 2 + 11 + 2 scored (each record's first is its
    # reference; the repeated responses are one input each: polar.ranked_eval.scoring_items)
    want, got = (json.loads((tmp_path / f"{p}_rewards.json").read_text()) for p in ("whole", "split"))
    assert len(want) == 15 and len(set(want)) == 15, want
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args,records,needle", [
    (["--seq-length", "512"], RECORDS, "--seq-length 512 is past the model's 256 positions"),
    ([], [], "no ranked record to evaluate"),
    (["--json", "."], RECORDS, "--json . is a directory"),
    (["--json", "ranked.jsonl"], RECORDS, "--json ranked.jsonl is the --input file"),  # it would replace it
])
def test_bad_arguments_stop_before_scoring_with_one_message(checkpoint, tmp_path, args, records, needle,
                                                           capsys, monkeypatch):
    """In this process: each refusal comes before any scoring (before engine.evaluate's scorer.start,
    the first step that starts a process group), from `polar eval`'s own code path."""
    from polar import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(_argv(tmp_path, checkpoint, records, *args))
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err[-3000:]
    assert "Traceback" not in err
    if records:  # the input is left as it was
        assert (tmp_path / "ranked.jsonl").read_text().splitlines()[0] == json.dumps(records[0])


@pytest.mark.parametrize("args", [["--max-length", "-5"], ["--max-response-length", "-1"], ["--seq-length", "-1"],
                                  ["--tp", "0"], ["--pp", "0"], ["--nproc", "0"], ["--nproc", "-2"]])
def test_a_negative_length_or_an_empty_layout_is_an_argument_error(args, capsys):
    from engine.evaluate import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--checkpoint", "c", "--input", "i", *args])
    assert e.value.code == 2 and f"argument {args[0]}: must be at least" in capsys.readouterr().err


def test_a_record_too_long_is_named_by_its_own_line(evaluated):
    """Records were found by their prompt object: two with the same one-character prompt (one string
    object in CPython) were merged and an error named the later record's line."""
    proc = evaluated[2]["long"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("ranked.jsonl:1: an output takes 124 tokens with its prompt and reference, more than the packed "
            "sequence length 64") in proc.stderr
    assert "ranked.jsonl:2" not in proc.stderr
