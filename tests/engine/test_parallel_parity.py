"""Tensor and pipeline parallel layouts against a single process: same initial weights, same global batches.

Each layout runs under torchrun over gloo and must reproduce the single-process loss and grad norm
of every optimizer step to fp32 rounding, and then evaluate to the single-process accuracy and loss.
The interleaved PP2 case is the layout where batched p2p over gloo silently corrupts gradients
(measured with megatron-core 0.16 and 0.19 on CPU: grad norm 1361 instead of 1.09, no error); it runs
with the engine's own settings, which turn batched p2p off on CPU.

The layouts of one world size train one after another in one torchrun launch, megatron's parallel
state rebuilt between them (tests/engine/dist_worker.py next_layout), each from the reference's
initial weights and compared with the reference's own process.

The harness and the reference run: tests/engine/parity.py. Data parallelism, recomputation and the
loss reduction: test_parallel_data.py; resuming: test_parallel_resume.py; FP8 under TP:
test_parallel_fp8.py; the kernel settings: test_kernel_selection.py.
"""
from __future__ import annotations

import pytest

from tests.engine.parity import NO_END_SAVE, STEPS, assert_trains_and_evaluates_alike, layouts_by_world


def test_reference_run_learns_something(reference):
    _, _, ref = reference
    losses = [row["loss"] for row in ref["history"]]
    # the comparison means nothing if nothing moves: the loss must leave ln 2 within the steps
    assert max(abs(v - 0.6931471805599453) for v in losses[1:]) > 1e-3, losses


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    # evaluation used to die here: megatron's interleaved schedule refuses a micro-batch count that
    # is not a multiple of pp, and the evaluation set's count is whatever the data gives
    "tp2_pp2_interleaved": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2"]),
    # the worker's defaults keep the auxiliary LM loss on, so this also covers the LM head under SP
    "tp2_sequence_parallel": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    # two sequences a micro-batch: the sequence-sharded readout maps each reward's row of the full
    # [s, b] batch to this rank's [s/tp, b] slice, which only a second sequence tells apart from s
    "tp2_sequence_parallel_mb2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch=2"]),
    # TP x PP without interleaving, where pipeline stages exchange the sequence-sharded [s/tp, b, h]
    # activations, with full recomputation of whole layers on top (one 4-process run for three
    # features: each must be exact for the run to match)
    "tp2_pp2_sequence_parallel_recompute_full": (4, ["parallel.tp=2", "parallel.pp=2",
                                                     "parallel.sequence_parallel=true",
                                                     "train.recompute=full", "train.recompute_num_layers=2"]),
}


@pytest.fixture(scope="module")
def runs(reference):
    """Every layout's run: one launch per world size."""
    tmp, init, _ = reference
    return layouts_by_world(tmp, "parity", LAYOUTS, NO_END_SAVE, init=init)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, runs, name):
    assert_trains_and_evaluates_alike(reference[2], runs[name])


def test_sequence_parallel_data_puts_reward_rows_on_both_shards():
    """tp2_sequence_parallel only tests the cross-shard readout if, within one micro-batch, reward
    rows fall in both halves of the sequence; checked on the batches the parity run trains on."""
    from engine.config import EngineConfig
    from engine.data import GlobalBatchLoader, PackedGroups
    from tests.engine.dist_worker import random_groups

    seq_length, vocab = 64, 64  # dist_worker's defaults
    data = PackedGroups(random_groups(7, 60, vocab, seq_length), seq_length)
    loader = GlobalBatchLoader(data, global_batch=4, micro_batch=1, dp_rank=0, dp_size=1,
                               seed=EngineConfig().train.seed, pad_id=0)
    for _ in range(STEPS):
        for mb in loader.next_microbatches():
            t = (mb.reward_index % seq_length).tolist()
            assert min(t) < seq_length // 2 <= max(t), t
