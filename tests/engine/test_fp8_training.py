"""FP8 (local linears, train.fp8=tensorwise / rowwise) trains the tiny reward model like fp32.

Three single-process runs of tests/engine/dist_worker.py, trained in turn in one process
(parity.run_layouts: starting python, torch and megatron is most of each run's time; init_runtime
sets the seed again for each), same seed (so the same initial weights: the FP8 layers are
megatron's layers initialised in the same order) and the same 100 global batches: fp32, FP8 per
tensor, FP8 per row. The tiny model (2 layers, width 32; every FP8 product dimension a multiple
of 16) memorises the 60 random groups, so its loss falls from ln 2 to ~0.015.
Only the training losses are compared: no run evaluates or saves a checkpoint.

The band: each 10-step window mean of the FP8 loss lies within BAND = 0.03 of the fp32 one.
FP8's rounding (2^-4 relative per e4m3 operand, 2^-3 per e5m2 gradient) acts as a small noise
on the updates; measured on this setup the largest window difference is 0.012 (tensorwise) and
0.006 (rowwise), so 0.03 leaves a 2.5x margin, while a broken FP8 product (wrong scale, layout or
transpose) leaves the loss near ln 2 or makes it diverge: differences of 0.3 and more.
"""
from __future__ import annotations

import pytest

from tests.engine.parity import NO_END_SAVE, run_layouts

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_query_groups=2",
        "model.ffn_hidden_size=64", "train.steps=100", "train.lr=3e-3", "train.warmup_steps=5",
        "train.global_batch=4", "data.seq_length=64", NO_END_SAVE]
BAND = 0.03
WINDOW = 10


def windows(result: dict) -> list[float]:
    losses = [row["loss"] for row in result["history"]]
    assert len(losses) == 100
    return [sum(losses[i:i + WINDOW]) / WINDOW for i in range(0, len(losses), WINDOW)]


RECIPES = ("tensorwise", "rowwise")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"fp32" and each recipe: its result}, all three from one process."""
    layouts = {"fp32": [], **{recipe: [f"train.fp8={recipe}"] for recipe in RECIPES}}
    return run_layouts(tmp_path_factory.mktemp("fp8_training"), "fp8_training", 1, layouts, *TINY,
                       "train.precision=fp32", no_eval=tuple(layouts))


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_loss_curve_stays_within_the_band_of_fp32(runs, recipe):
    ref, got = runs["fp32"], runs[recipe]
    want, have = windows(ref), windows(got)
    assert want[0] - want[-1] > 0.5, want  # fp32 learns: the comparison means something
    diffs = [abs(a - b) for a, b in zip(have, want)]
    assert max(diffs) <= BAND, list(zip(have, want))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got["history"], ref["history"])) > 1e-4  # really FP8


def test_each_recipe_runs_its_own_scaling(runs):
    """Both recipes inside the band say nothing of which one ran: a train.fp8=rowwise run whose linears ran
    the per-tensor recipe passes the test above. Their losses part."""
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["tensorwise"]["history"],
                                                          runs["rowwise"]["history"])) > 1e-4
