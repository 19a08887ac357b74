"""FP8 under tensor parallelism against one FP8 process (the harness: tests/engine/parity.py). The runs of
one world size train one after another in one launch (parity.run_layouts)."""
from __future__ import annotations

import pytest

from tests.engine.parity import NO_END_SAVE, STEPS, by_step, run_layouts


# FP8 (train.fp8, local linears): TP2 against one process, both in FP8, same initial weights. With the
# TP amax reductions every scale equals the single-process one, so step 1 (before any update) differs
# only by fp32 summation order: FP8_FIRST. Later steps differ more, for a stated reason: a
# summation-order difference of one fp32 ulp moves a value across an FP8 rounding boundary now and
# then (an e4m3 step is 2^-3 relative, an e5m2 step 2^-2), and Adam's first updates, about lr x
# sign(gradient), turn a changed sign of a near-zero gradient into a full lr-sized step. Per tensor
# the scale is not a power of two, which makes this far worse (likely: an ulp's difference in a
# tensor's amax moves the scale of all its elements at once). Measured: with the per-tensor scales
# rounded down to powers of two (in a scratch copy) TP2 matches one process in 5 digits through step
# 4; as the recipe is, the step-4 gradient norm differs by 8.6e-2 (5.6e-2 since CPU products take row
# scales, engine/model/fp8_linear._mm) and the loss by 3.5e-3, where 1.8e-2 was measured when the
# bound was set at 5e-2 (it failed at cf4a3fe); with sequence parallelism, the launch below, 2.3e-2
# and 3.2e-3. That step-4 norm is chaotic: one FP8 process differs from fp32 by 35% there. FP8_LATER
# bounds it (this harness trains every step at lr 1e-2; rowwise measured 1e-7 and 7e-8). Without the
# TP amax reduction the per-tensor step-1 gradient norm moved by 3e-3 at TP2 alone, without the
# sequence-parallel input's amax reduction by 1.3e-3 (both measured), each failing FP8_FIRST; per row,
# the power-of-two scales of a shard's rows happened to equal the whole rows' here, so this harness
# does not see a missing per-row reduction.
FP8_FIRST = dict(rel=1e-5, abs=1e-6)
FP8_LATER = {"tensorwise": {"loss": 1e-2, "grad_norm": 0.2}, "rowwise": {"loss": 1e-2, "grad_norm": 5e-2}}


@pytest.fixture(scope="module")
def fp8_references(reference):
    tmp, init, _ = reference
    runs = {r: [f"train.fp8={r}"] for r in ("tensorwise", "rowwise")}
    got = run_layouts(tmp, "fp8_references", 1, {f"fp8_{r}": x for r, x in runs.items()}, NO_END_SAVE, init=init,
                      no_eval=tuple(f"fp8_{r}" for r in runs))
    return {r: got[f"fp8_{r}"] for r in runs}


# each recipe under TP2 with sequence parallelism: the column-parallel linears quantize their token shard,
# all-gather it in FP8 (per tensor with the amax max-reduced over the group; per row with the rows' scales)
# and keep only the shard, gathered again for wgrad (engine/model/fp8_linear.py). Per tensor with full
# recomputation on top, whose recomputed forwards gather again (measured: the same losses and gradient
# norms bit for bit as without it). The TP-only column path (activations replicated) has no run here.
LAYOUTS = {
    "tensorwise-tp2_sequence_parallel_recompute_full": (
        "tensorwise", ["parallel.tp=2", "parallel.sequence_parallel=true", "train.recompute=full",
                       "train.recompute_num_layers=2"]),
    "rowwise-tp2_sequence_parallel": ("rowwise", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
}


@pytest.fixture(scope="module")
def fp8_tp2(reference):
    """LAYOUTS' runs: {name: result}."""
    tmp, init, _ = reference
    runs = {f"fp8_{name}": [f"train.fp8={recipe}", *layout] for name, (recipe, layout) in LAYOUTS.items()}
    got = run_layouts(tmp, "fp8_tp2", 2, runs, NO_END_SAVE, init=init, no_eval=tuple(runs))
    return {name: got[f"fp8_{name}"] for name in LAYOUTS}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fp8_tensor_parallel_matches_single_process_fp8(reference, fp8_references, fp8_tp2, name):
    ref32 = reference[2]
    recipe, _ = LAYOUTS[name]
    r, g = by_step(fp8_references[recipe]), by_step(fp8_tp2[name])
    assert g[1]["loss"] == pytest.approx(r[1]["loss"], **FP8_FIRST)
    assert g[1]["grad_norm"] == pytest.approx(r[1]["grad_norm"], **FP8_FIRST)
    for s in range(2, STEPS + 1):
        for key, rel in FP8_LATER[recipe].items():
            assert g[s][key] == pytest.approx(r[s][key], rel=rel), f"{key} at step {s}"
    # and FP8 is really on: its step-1 gradient norm differs from the fp32 run's
    assert abs(r[1]["grad_norm"] - by_step(ref32)[1]["grad_norm"]) > 5e-5 * r[1]["grad_norm"]
