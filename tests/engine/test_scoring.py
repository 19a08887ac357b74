"""engine/scoring.py: scoring in schedule calls of at most `per_call` batches (each moved to the
device only for its call) gives the rewards of one call per shape, in input order, and reports
its progress after every call."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.packing import collate
from tests.engine.model.test_reward_model import build_model, random_groups


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(3)
    groups = random_groups(rng, 14)
    # two shapes, in runs: 5 of 96 tokens, 4 of 128, 5 of 96 again
    lengths = [96] * 5 + [128] * 4 + [96] * 5
    return [collate([[g]], n, 0) for g, n in zip(groups, lengths)]


def test_calls_of_any_size_give_the_rewards_of_one_call_per_shape(runtime, batches):
    from engine.scoring import score

    model = build_model(runtime, seed=1)
    whole = score([model], batches, runtime)
    assert whole.numel() == sum(int(b.reward_index.numel()) for b in batches)
    for per_call in (1, 2, 3):
        seen = []
        got = score([model], batches, runtime, per_call=per_call, progress=lambda d, t: seen.append((d, t)))
        torch.testing.assert_close(got, whole, rtol=0, atol=0)
        # calls never cross a shape boundary (5 | 4 | 5) and hold at most per_call batches
        bounds = [0] + [d for d, _ in seen]
        assert all(0 < b - a <= per_call for a, b in zip(bounds, bounds[1:])) and seen[-1] == (14, 14)
        assert {5, 9} <= set(bounds)
    # each candidate's reward is its own: scored alone, batch by batch, it is the same
    alone = torch.cat([score([model], [b], runtime) for b in batches])
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


def test_the_progress_line_has_rate_and_eta_and_stays_quiet_at_the_end(capsys):
    from engine.progress import scoring_progress

    report = scoring_progress(0.0, True, 4)
    report(3, 12)
    report(12, 12)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("scoring: 3/12 packed sequences (this rank's share: 1/4 of them) | ")
    assert "sequences/s | eta " in out[0]
    quiet = scoring_progress(0.0, False, 1)  # another rank
    quiet(3, 12)
    slow = scoring_progress(3600.0, True, 1)  # not yet time for a line
    slow(3, 12)
    assert capsys.readouterr().out == ""
    lines = scoring_progress(0.0, True, unit="lines")  # polar score's: input lines, a chunk part-scored
    lines(2.5, 10)
    got = capsys.readouterr().out
    assert got.startswith("scoring: 2/10 lines | ") and " lines/s | eta " in got
