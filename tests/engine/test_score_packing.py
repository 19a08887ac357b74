"""`polar score` (engine/score.py, CheckpointScorer.pack) packs a chunk's groups best fit, as `polar
serve` packs its rows, not in input order: a chunk whose lines come longest first took a row for
every long line and more for the short ones after them. The rewards are those of each line scored
alone. (A resumed run's chunks, and so their best-fit rows, being the stopped run's, its output is
byte for byte a run's never stopped: tests/engine/test_score_chunks.py, the killed run.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tests.engine import test_score_chunks as chunks

checkpoint = chunks.checkpoint  # its small model, made once for this module
# six lines of 98 tokens, then six of 11-16: rows of 128 hold one long and one short line, or all the short ones
LONG = [{"prompt": f"question {i}: " + "q" * 10, "reference": "r" * 20, "output": f"answer {i} " + "a" * 20}
        for i in range(6)]
SHORT = [{"prompt": f"p{i}", "reference": "r", "output": "o" * (1 + i)} for i in range(6)]


def _group_lengths(lines: list) -> np.ndarray:
    """Each line's tokens as polar score packs it (one output a line: one group)."""
    from engine.score import lcp_group
    from polar.client_format import ScoringItem, client_encode_batch
    from polar.tokenizer import ByteTokenizer

    served = client_encode_batch(ByteTokenizer(), [ScoringItem(x["prompt"], x["reference"], x["output"])
                                                   for x in lines])
    return np.array([len(lcp_group([s.ids])) for s in served], dtype=np.int64)


def _rows(lengths: np.ndarray, seq: int, method: str) -> int:
    from engine.packing import plan_sequences

    return len(plan_sequences(lengths, seq, method))


def test_a_chunk_in_a_bad_order_packs_into_fewer_rows_each_group_once():
    """pack() alone (no model): the planned rows are best fit's, each group in exactly one of them."""
    import torch

    from engine.score import CheckpointScorer, lcp_group

    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(60, 100, 40), rng.integers(5, 30, 40)])  # longest first
    # group g's tokens all g + 1 (0 pads): which groups a row holds, and in what order, is read off it
    lines = [lcp_group([np.full(n, g + 1, dtype=np.int32)]) for g, n in enumerate(lengths)]
    scorer = object.__new__(CheckpointScorer)
    scorer.model_cfg = SimpleNamespace(max_position_embeddings=128)
    scorer.tokenizer = SimpleNamespace(pad_id=0)
    scorer.rt = None
    packed = scorer.pack(lines, 128)
    ordered, best = _rows(lengths, 128, "ordered"), _rows(lengths, 128, "best_fit")
    assert best < ordered  # the case this test is about
    assert len(packed.batches) == packed.facts["sequences"] == best
    held = []
    for b in packed.batches:
        tokens = b.tokens.flatten()
        ids, counts = torch.unique_consecutive(tokens[tokens > 0], return_counts=True)
        assert [int(n) for n in counts] == [int(lengths[g - 1]) for g in ids.tolist()]
        held += [g - 1 for g in ids.tolist()]
    # score_packed maps rewards back through packed.order: collate's order, each group once
    assert held == packed.order and sorted(held) == list(range(len(lines)))
    assert packed.candidates == [1] * len(lines)


def _score(tmp: Path, checkpoint: str, name: str, *extra) -> subprocess.CompletedProcess:
    inp, out = tmp / "in.jsonl", tmp / f"{name}.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LONG + SHORT))
    proc = subprocess.run([sys.executable, "-m", "polar.cli", "score", "--checkpoint", checkpoint, "--input",
                           str(inp), "--output", str(out), "--tokenizer", "byte", *extra],
                          cwd=tmp, env=chunks.ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc.rows = [json.loads(x) for x in out.read_text().splitlines()]
    return proc


def test_a_chunk_in_a_bad_order_scores_in_fewer_rows_with_each_lines_own_rewards(tmp_path, checkpoint):
    lengths = _group_lengths(LONG + SHORT)
    assert lengths[:6].min() > 64 and lengths[6:].max() < 128 - lengths[:6].max() and lengths.max() <= 128
    ordered, best = _rows(lengths, 128, "ordered"), _rows(lengths, 128, "best_fit")
    # input order: a row each long line (the last one with the first short line) and one for the other
    # short lines; best fit: a long and a short line a row
    assert (ordered, best) == (7, 6)
    packed = _score(tmp_path, checkpoint, "packed")  # one chunk, rows of 128 (the longest line rounded up)
    assert f"in {best} packed sequences of 128 tokens" in packed.stdout, packed.stdout
    alone = _score(tmp_path, checkpoint, "alone", "--chunk-lines", "1")  # a row each, nothing beside it
    assert "in 12 packed sequences of" in alone.stdout, alone.stdout
    assert [r["line"] for r in packed.rows] == [r["line"] for r in alone.rows] == list(range(1, 13))
    np.testing.assert_allclose([r["reward"] for r in packed.rows], [r["reward"] for r in alone.rows],
                               rtol=1e-5, atol=1e-6)
