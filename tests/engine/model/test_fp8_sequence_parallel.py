"""Column-parallel FP8 linears under sequence parallelism (engine/model/fp8_linear.py), TP2 over gloo:
tests/engine/model/fp8_sp_worker.py measures the bytes each keeps for the backward and compares it with
the composition the engine ran before (the input all-gathered in bf16, the FP8 product of all of it).

Before, the layer kept the gathered input, TP times megatron's own bf16 linear: per tensor its FP8 copy
(1 byte x all tokens x K, as much as bf16 keeps at TP2), per row the gathered bf16 (2 bytes x all tokens
x K). Now it keeps this rank's shard (per tensor in FP8, per row in bf16, as megatron does) and gathers
it again in the backward, with outputs and gradients bit-identical to the old composition's, within
the weight cache too.
"""
from __future__ import annotations

import pytest

from tests.engine.model import fp8_sp_worker as worker

TP = worker.TP
SCALE_BYTES = 4  # a per-tensor scale: one fp32


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return worker.launch(tmp_path_factory.mktemp("fp8_sp") / "saved")


def rows(measured, recipe):
    return [(rank, name, row) for rank, by_recipe in enumerate(measured) for name, row in by_recipe[recipe].items()]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_outputs_and_gradients_are_the_old_compositions_bit_for_bit(measured, recipe):
    for rank, name, row in rows(measured, recipe):
        assert row["equal_uncached"], (rank, name)
        assert row["equal_cached"], (rank, name)


@pytest.mark.parametrize("recipe,element_bytes,extra", [("tensorwise", 1, SCALE_BYTES), ("rowwise", 2, 0)])
def test_only_the_local_shard_is_kept_for_the_backward(measured, recipe, element_bytes, extra):
    for rank, name, row in rows(measured, recipe):
        assert row["local_tokens"] * TP == row["tokens"]
        local = row["local_tokens"] * row["in_features"]
        assert row["saved"] == element_bytes * local + extra, (rank, name, row["tensors"])
        # the old composition kept all tokens' copy: what the measurement tells from the fix
        assert row["saved_old"] == element_bytes * local * TP + extra, (rank, name)


def test_megatrons_bf16_linear_keeps_its_shard(measured):
    """The baseline: rowwise FP8 now keeps what megatron's bf16 linear keeps, per tensor half of it."""
    for (rank, name, off), (_, _, per_row), (_, _, per_tensor) in zip(
            rows(measured, "off"), rows(measured, "rowwise"), rows(measured, "tensorwise")):
        assert off["saved"] == 2 * off["local_tokens"] * off["in_features"] == per_row["saved"], (rank, name)
        assert per_tensor["saved"] == off["saved"] // 2 + SCALE_BYTES


# One backward's collectives and products in issue order. A collective waits for those issued before it on
# its group (one NCCL stream per communicator), so the async gather of the kept shard overlaps the dgrad
# product only if no collective follows it before that product (dy's amax all-reduce, dgrad's weight
# scales: issued first), and the reduce-scatter of dx, issued async before the wgrad product, overlaps it,
# as megatron's own linear does both.
OVERLAPPED = {
    "tensorwise": ["all_reduce", "all_gather_into_tensor async", "product", "reduce_scatter_tensor async",
                   "wait all_gather_into_tensor", "product", "wait reduce_scatter_tensor"],
    "rowwise": ["all_reduce", "all_reduce", "all_gather_into_tensor async", "product", "reduce_scatter_tensor async",
                "wait all_gather_into_tensor", "product", "wait reduce_scatter_tensor"],
}


@pytest.mark.parametrize("recipe", list(OVERLAPPED))
def test_the_backwards_communication_overlaps_its_products(measured, recipe):
    for rank, name, row in rows(measured, recipe):
        assert row["backward_events"] == OVERLAPPED[recipe], (rank, name)
