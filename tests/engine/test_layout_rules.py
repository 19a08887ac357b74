"""engine.layout_rules.global_batch_unit against check_layout itself: the train.global_batch values the
layout check accepts are exactly the unit's multiples, at every layout of a small grid (fine-tuning's
start-up line names a batch by the unit, so a unit apart from the check would name a refused batch)."""
from __future__ import annotations

import itertools

import pytest

from engine.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from engine.layout_rules import check_layout, global_batch_unit

MODEL = ModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128)


def _accepted(par: ParallelConfig, micro_batch: int, world: int, global_batch: int) -> bool:
    try:
        check_layout(MODEL, par, TrainConfig(global_batch=global_batch, micro_batch=micro_batch), world, 64)
    except ConfigError as err:
        assert "global_batch" in str(err) or "micro-batches per step" in str(err), err
        return False
    return True


LAYOUTS = [(tp, pp, vpp, mb, world)
           for tp, pp, vpp, mb, world in itertools.product((1, 2), (1, 2, 4), (None, 2), (1, 2), (4, 8, 16))
           if (vpp is None or pp >= 2) and world % (tp * pp) == 0]


@pytest.mark.parametrize("tp, pp, vpp, mb, world", LAYOUTS)
def test_the_accepted_global_batches_are_the_multiples_of_the_unit(tp, pp, vpp, mb, world):
    par = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    unit = global_batch_unit(par, mb, world // (tp * pp))
    accepted = [gb for gb in range(1, 4 * unit + 1) if _accepted(par, mb, world, gb)]
    assert accepted == [unit, 2 * unit, 3 * unit, 4 * unit]


@pytest.mark.parametrize("tp, pp, vpp, mb, world, unit", [
    (1, 1, None, 1, 8, 8),  # 8 data-parallel ranks, one micro-batch each
    (2, 2, None, 2, 8, 4),  # 2 ranks of 2 micro-batches
    (1, 2, 2, 1, 8, 8),  # 4 ranks, each running micro-batches in groups of pp=2
    (2, 4, 2, 2, 16, 16),  # 2 ranks x 2 a micro-batch x groups of 4
])
def test_the_unit_is_whole_micro_batches_and_with_interleaving_groups_of_pp(tp, pp, vpp, mb, world, unit):
    assert global_batch_unit(ParallelConfig(tp=tp, pp=pp, vpp=vpp), mb, world // (tp * pp)) == unit
