"""`polar score` (engine/score.py) and `polar eval` (engine/evaluate.py) with a real checkpoint of
the engine: the same rewards as the training loop's evaluation, at any layout, one line per input.

Starting python, torch and megatron is most of a tiny run's time: the training, the --nproc 1 score and
eval and the training loop's InfoNCE evaluation share one process (tests/engine/entry_runs.py, the
module's `launched`); --nproc 2 keeps its launches (polar, torchrun and the ranks)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.engine import entry_runs

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "data.seq_length=1024", "synthetic.train_triplets=200",
        "synthetic.eval_triplets=60", "synthetic.prompts=100", "log.tensorboard=false", "train.time_limit_s=0",
        "train.global_batch=4", "train.warmup_steps=1", "log.interval=1"]
SYNTHETIC_SEED = 0  # the default synthetic.seed: the held-out triplets below are the run's own


def run(args, cwd, nproc=1):
    """`polar ARGS` (score, eval) as a process of its own."""
    cmd = [sys.executable, "-m", "polar.cli", *args]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=900, cwd=cwd)


def held_out_triplets():
    from polar.pretrain_data import SyntheticDataConfig, make_splits

    cfg = SyntheticDataConfig(seed=SYNTHETIC_SEED, train_triplets=200, eval_triplets=60, prompts=100)
    return make_splits(cfg).eval_held_out


def write_records(path, triplets):
    with open(path, "w") as f:
        for t in triplets:
            f.write(json.dumps({"prompt": t.prompt, "reference": t.reference, "chosen": t.chosen,
                                "rejected": t.rejected, "wrapper": "sft"}) + "\n")


def score_args(tmp, name, *extra, records="records.jsonl"):
    """`polar score`'s arguments on tmp/records, the output tmp/name.jsonl."""
    return ["score", "--checkpoint", str(tmp / "pre" / "checkpoints"), "--input", str(tmp / records),
            "--output", str(tmp / f"{name}.jsonl"), *extra]


def score_rows(tmp, name, proc):
    """(rows, stdout) of the `polar score` run `proc` that wrote tmp/name.jsonl."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp / f"{name}.jsonl").read_text().splitlines()], proc.stdout


def score(tmp, name, *extra, nproc=1, records="records.jsonl"):
    """(rows, stdout) of `polar score` on tmp/records, as a process."""
    return score_rows(tmp, name, run(score_args(tmp, name, *extra, records=records), tmp, nproc=nproc))


def infonce_groups(triplets) -> list:
    """Groups of K = 3 and 4 candidates with one or two positives, the positives at every place."""
    groups = []
    for i, t in enumerate(triplets):
        other = triplets[(i + 1) % len(triplets)]
        cands = [(t.chosen, 1), (t.rejected, 0), (other.rejected, 0)] + [(other.chosen, 1)] * (i % 2)
        cands = cands[i % len(cands):] + cands[:i % len(cands)]
        groups.append({"prompt": t.prompt, "reference": t.reference, "wrapper": "sft",
                       "candidates": [{"text": text, "label": label} for text, label in cands]})
    return groups


SHAPES = [
    {"prompt": "a prompt", "reference": "the ref", "output": ""},  # an empty output is scored
    {"prompt": [{"role": "user", "content": "hi"}], "reference": "r", "candidates": ["x", {"text": "y z"}, ""]},
    {"prompt": "p", "reference": "r", "chosen": "c", "rejected": "d", "wrapper": "pretrain"},
    {"prompt": "a prompt", "reference": "the ref", "output": "an answer"},
]
# RANKED's responses below each reference as groups: what `polar eval` scores
RANKED = [
    {"prompt": "q1", "category": "math", "responses": [{"text": "ref one", "rank": 1},
                                                        {"text": "good", "rank": 2}, {"text": "bad", "rank": 3}]},
    {"prompt": "q2", "category": "code", "responses": ["ref two", "fine answer", "meh", "awful"]},
]
RANKED_GROUPS = [{"prompt": "q1", "reference": "ref one", "candidates": ["good", "bad"]},
                 {"prompt": "q2", "reference": "ref two", "candidates": ["fine answer", "meh", "awful"]}]
BAD = '{"prompt": "p"}\nnot json\n'


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """In one process, one after the other: the training (`pre`); `polar score` of records.jsonl under
    --on-error skip (`tp1`: the held-out triplets as records, then as InfoNCE groups (infonce_groups),
    then SHAPES, RANKED_GROUPS and BAD's two bad lines; one run serves every test below that reads
    rewards at TP1); the training loop's evaluation of the trained weights on those groups packed by
    `polar data build` (`eval_infonce`: engine/pretrain.py, train.steps=0, train.loss=infonce); `polar
    eval` of RANKED (`eval`). (tmp, {name: CompletedProcess})."""
    from polar import data_build

    tmp = tmp_path_factory.mktemp("score")
    triplets = held_out_triplets()
    groups = infonce_groups(triplets)
    write_records(tmp / "records.jsonl", triplets)
    with open(tmp / "records.jsonl", "a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in groups + SHAPES + RANKED_GROUPS) + BAD)
    (tmp / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    assert data_build.main([str(tmp / "groups.jsonl"), "-o", str(tmp / "groups_ds"), "--seq-length", "1024",
                            "--quiet"]) == 0
    built = str(tmp / "groups_ds")
    (tmp / "ranked.jsonl").write_text("\n".join(json.dumps(r) for r in RANKED) + "\n")
    ckpts = str(tmp / "pre" / "checkpoints")
    done = entry_runs.launch(tmp, [
        entry_runs.run("pre", "engine.pretrain", *TINY, "train.steps=6", "train.lr=3e-3", f"run_dir={tmp / 'pre'}",
                       cwd=tmp),
        entry_runs.run("tp1", "polar.cli", *score_args(tmp, "tp1", "--on-error", "skip"), cwd=tmp),
        entry_runs.run("eval_infonce", "engine.pretrain", *TINY, "train.steps=0", "train.loss=infonce",
                       f"data.path={built}", f"data.eval_path={built}", f"checkpoint.init_from={ckpts}",
                       f"run_dir={tmp / 'eval_infonce'}", cwd=tmp),
        entry_runs.run("eval", "polar.cli", "eval", "--checkpoint", ckpts, "--input", str(tmp / "ranked.jsonl"),
                       "--json", str(tmp / "acc.json"), cwd=tmp),
    ], label="score_eval")
    return tmp, done


@pytest.fixture(scope="module")
def trained(launched):
    tmp, done = launched
    assert done["pre"].returncode == 0, done["pre"].stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def scored(trained, launched):
    """`launched`'s --on-error skip run: (triplets, groups, rows, stdout)."""
    triplets = held_out_triplets()
    groups = infonce_groups(triplets)
    rows, stdout = score_rows(trained, "tp1", launched[1]["tp1"])
    assert [r["line"] for r in rows] == list(range(1, len(triplets) + len(groups) + len(SHAPES) + len(RANKED_GROUPS)
                                                    + BAD.count("\n") + 1))
    return triplets, groups, rows, stdout


@pytest.fixture(scope="module")
def held_out(scored):
    """The held-out triplets and groups, and their rows: (triplets, groups, rows)."""
    triplets, groups, rows, _ = scored
    return triplets, groups, rows[:len(triplets) + len(groups)]


def test_score_equals_the_training_loops_evaluation(trained, held_out):
    """The training loop's evaluation (the trained run's own, of its final weights: the ones its
    checkpoint holds) and `polar score` of that checkpoint on the same held-out triplets give the same
    loss and pair accuracy. The comparison means something because both paths give identical token
    ids for this data."""
    from polar.client_format import ScoringItem, client_encode_batch
    from polar.format import encode_groups
    from polar.tokenizer import ByteTokenizer

    tmp = trained
    triplets, _, rows = held_out
    tok = ByteTokenizer()
    train_form = encode_groups(tok, [t.prompt for t in triplets], [t.reference for t in triplets],
                               [[t.chosen, t.rejected] for t in triplets], max_length=1024)
    served = client_encode_batch(tok, [ScoringItem(t.prompt, t.reference, c) for t in triplets
                                       for c in (t.chosen, t.rejected)])
    for k, g in enumerate(train_form):
        for j in range(2):
            assert np.array_equal(g.full(j), served[2 * k + j].ids)

    margin = np.array([r["chosen_reward"] - r["rejected_reward"] for r in rows[:len(triplets)]])
    loss = float(np.mean(np.logaddexp(0.0, -margin)))
    acc = float(np.mean((margin > 0) + 0.5 * (margin == 0)))

    summary = json.loads((tmp / "pre" / "summary.json").read_text())
    assert summary["held_out_pairs"] == len(triplets)
    assert loss == pytest.approx(summary["held_out_loss"], rel=1e-5)
    assert acc == pytest.approx(summary["held_out_pair_accuracy"], abs=1e-12)
    # the model was trained: its value head (zero at initialisation) gives rewards that differ
    assert np.abs(margin).max() > 1e-3, margin


def test_infonce_groups_of_three_and_four_score_as_the_training_loop_evaluates(trained, launched, held_out):
    """The same with InfoNCE on groups of K = 3 and 4 candidates with one or two positives (pairs and
    positives differ): `polar data build` packs the groups for the training loop's evaluation
    (data.eval_path, `launched`'s eval_infonce), and the pairs, pair accuracy and per-positive loss
    (engine/loss.py) computed from `polar score`'s rewards of the same records must equal it."""
    tmp = trained
    triplets, groups, rows = held_out
    proc = launched[1]["eval_infonce"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp / "eval_infonce" / "summary.json").read_text())

    pairs = correct = positives = loss = 0.0
    for row, group in zip(rows[len(triplets):], groups, strict=True):
        labels = [c["label"] for c in group["candidates"]]
        r = np.array(row["rewards"])
        pos, neg = r[np.array(labels) == 1], r[np.array(labels) == 0]
        margin = pos[:, None] - neg[None, :]
        pairs += margin.size
        correct += float(np.sum((margin > 0) + 0.5 * (margin == 0)))
        positives += len(pos)
        loss += sum(float(np.logaddexp.reduce(np.append(neg, p)) - p) for p in pos)
    assert summary["eval_pairs"] == pairs == sum(4 if i % 2 else 2 for i in range(len(groups)))
    assert correct / pairs == pytest.approx(summary["eval_pair_accuracy"], abs=1e-12)
    assert loss / positives == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert 0 < correct < pairs, (correct, pairs)  # neither all right nor all wrong: the count is tested


# DP 2 against one process: tests/engine/test_score_chunks.py, two replicas
@pytest.mark.parametrize("name,extra", [("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"])])
def test_score_at_other_layouts_equals_one_process(trained, scored, name, extra):
    """The whole input of `scored`: its bad lines are the same error lines at every layout."""
    ref = scored[2]
    got, _ = score(trained, name, "--on-error", "skip", *extra, nproc=2)
    assert [r["line"] for r in got] == [r["line"] for r in ref]
    for g, r in zip(got, ref):
        if "error" in r:
            assert g == r
        else:
            np.testing.assert_allclose(g["rewards"], r["rewards"], rtol=1e-5, atol=1e-6)




@pytest.fixture(scope="module")
def shapes(trained, scored):
    """The rows of SHAPES, RANKED_GROUPS, then BAD's two bad lines, scored under --on-error skip after
    the held-out lines: (input, stdout, rows, the line number before SHAPES')."""
    triplets, groups, rows, stdout = scored
    before = len(triplets) + len(groups)
    return trained / "records.jsonl", stdout, rows[before:], before


def test_every_input_shape_and_empty_outputs(shapes):
    """(That an item's reward inside a packed batch is its reward alone is
    tests/engine/test_score_packing.py's, lines packed against --chunk-lines 1, and
    tests/engine/test_score_split.py's, the outputs of a shared prefix against each alone.)"""
    rows, before = shapes[2][:len(SHAPES)], shapes[3]
    assert [r["line"] - before for r in rows] == [1, 2, 3, 4] and [len(r["rewards"]) for r in rows] == [1, 3, 2, 1]
    assert rows[0]["reward"] == rows[0]["rewards"][0] and "chosen_reward" in rows[2]
    assert all(math.isfinite(v) for r in rows for v in r["rewards"])


def test_bad_lines_are_named_or_kept_in_place(trained, tmp_path, shapes, capsys):
    from polar.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "p", "reference": "r", "output": "o"}\n' + BAD)
    # in this process (as `polar score` runs at --nproc 1): the check comes before any process group or model
    assert main(["score", "--checkpoint", str(trained / "pre" / "checkpoints"), "--input", str(inp), "--output",
                 str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: reference: missing" in err, err[-2000:]
    inp, stdout, rows, before = shapes  # under --on-error skip
    assert [r["line"] - before for r in rows] == list(range(1, 9)) and all("rewards" in r for r in rows[:6])
    assert "reference: missing" in rows[6]["error"] and "not valid JSON" in rows[7]["error"]
    # the output file holds every error; the console names how many and the first
    assert f"2 bad line(s), written as error lines (--on-error skip); the first: {inp}:{before + 7}: reference: " \
        "missing" in stdout, stdout[-2000:]
    # the summary counts the bad lines beside the scored ones ("of N lines (2 bad)" read as 2 of the N)
    lines = sum(1 for _ in open(inp))
    assert re.search(rf"^scored [\d,]+ outputs of {lines - 2:,} lines \(and 2 bad lines\) in ", stdout, re.M), stdout


def test_a_layout_wider_than_the_processes_says_how_many_to_start(trained, tmp_path, capsys):
    """`polar score --tp 2` in one process said "world size 1 is not divisible by parallel.tp x
    parallel.pp", settings a scoring user never wrote, and not how to start two processes. In this
    process (as `polar score` runs at --nproc 1): the refusal comes before any process group."""
    from polar.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "p", "reference": "r", "output": "o"}\n')
    assert main(["score", "--checkpoint", str(trained / "pre" / "checkpoints"), "--input", str(inp), "--output",
                 str(tmp_path / "out.jsonl"), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "--tp 2 x --pp 1: a model replica spans 2 processes, but this run has 1; start 2 (or a multiple): " \
           "--nproc 2" in err, err[-2000:]


def test_eval_on_ranked_data_matches_the_scores(trained, launched, shapes):
    """`polar eval` pairs below the reference and scores them with the model; its accuracy equals
    the one computed by hand from `polar score` rewards of the same responses (RANKED_GROUPS)."""
    result_path = trained / "acc.json"
    proc = launched[1]["eval"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overall" in proc.stdout and "math" in proc.stdout
    result = json.loads(result_path.read_text())
    assert result["overall"]["pairs"] == 1 + 3
    r1, r2 = [r["rewards"] for r in shapes[2][len(SHAPES):len(SHAPES) + len(RANKED_GROUPS)]]
    correct = int(r1[0] > r1[1]) + sum(int(r2[i] > r2[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    assert result["overall"]["correct"] == correct
    assert result["categories"]["math"]["pairs"] == 1 and result["categories"]["code"]["pairs"] == 3
