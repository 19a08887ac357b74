"""polar plan's activations under recomputation against what the engine's layer keeps.

One launch measures the engine's bf16 layer at TP2 over gloo (tests/engine/model/fp8_sp_worker.py --layers
--recompute none,selective,full: one layer's saved bytes as 2 layers less 1, per recipe, with and without SP),
on CPU with the blocks backend, which takes torch's dense path at the worker's 64 tokens.

megatron's selective recomputation checkpoints the core attention, which keeps its inputs and no output:
in bf16 the attention output is kept by linear_proj, the input it saves; the local per-tensor FP8 linear
keeps its e4m3 copy instead, so nothing keeps the bf16 output. Per tensor keeps 20464 B less than bf16 with
SP, 28656 B without, 8192 B (the bf16 attention output, 128 tokens x h/t 32 x 2 bytes) more than without
recomputation, where the plan priced the same difference as without recomputation.

The same launch's layer without recomputation serves test_fp8_activations_are_what_the_engines_layer_keeps
(the --layers measurement tests/polar/test_plan.py launched on its own).
"""
from __future__ import annotations

import re

import pytest

from polar import plan
from polar.plan_model import layer_activation_bytes, memory_per_rank
from tests.engine.model import fp8_sp_worker as worker
from tests.polar.test_plan import _memory_and_launch, _shape


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return worker.launch(tmp_path_factory.mktemp("layers") / "layers", "--layers", "--recompute",
                         "none,selective,full")[0]


def per_layer(recompute: str, sp: bool, recipe: str = "off", backend: str = "triton") -> float:
    """The plan's activation bytes for one more layer of the worker's model (the stage-wide terms cancel)."""
    m = worker.MODEL
    layout = plan.Layout(tp=worker.TP, pp=1, dp=1, micro_batch=worker.BATCH, recompute=recompute,
                         sequence_parallel=sp)
    acts = []
    for layers in (1, 2):
        shape = plan.Shape(layers, m["hidden_size"], m["num_attention_heads"], m["num_query_groups"],
                           m["ffn_hidden_size"], m["vocab_size"])
        acts.append(memory_per_rank(shape, layout, worker.SEQ, worker.BATCH, 0, fp8=recipe != "off",
                                    fp8_inputs=plan.fp8_keeps_inputs(recipe),
                                    attention_backend=backend)["activations"])
    return acts[1] - acts[0]


def test_fp8_activations_are_what_the_engines_layer_keeps(measured, capsys):
    """One layer's bytes kept for the backward, FP8 less bf16, measured on the engine's bf16 model at TP2 with
    and without sequence parallelism (tests/engine/model/fp8_sp_worker.py --layers: the attention backend's
    and the norms' own tensors cancel in the difference) against the plan's. The plan priced every recipe as
    bf16: per tensor the linears keep e4m3 copies in place of the norm outputs and the SwiGLU product (and
    one of the attention output beside it); per row the bf16 inputs, each rank its token shard under SP."""
    shape, tokens = _shape(worker.MODEL), worker.SEQ * worker.BATCH
    for name, sp in (("sp", True), ("no_sp", False)):
        bf16 = layer_activation_bytes(shape, tokens, worker.TP, sp)
        kept = measured["none"][name]
        for recipe in ("tensorwise", "rowwise"):
            inputs = plan.fp8_keeps_inputs(recipe)
            priced = layer_activation_bytes(shape, tokens, worker.TP, sp, fp8_inputs=inputs) - bf16
            assert priced == kept[recipe] - kept["off"], (name, recipe, measured)
    # and `polar plan` prices a run's recipe so: per tensor fewer activation bytes than bf16, per row the same
    pinned = ["--config", "polar_1_8b", "--gpus", "8", "parallel.tp=2", "parallel.pp=1",
              "parallel.sequence_parallel=true", "train.micro_batch=1"]
    acts = {}
    for recipe in ("off", "tensorwise", "rowwise"):
        _, memory, _ = _memory_and_launch(capsys, [*pinned, f"train.fp8={recipe}"])
        acts[recipe] = float(re.search(r"activations ([\d.]+) GB", memory).group(1))
    assert acts["tensorwise"] < acts["off"] == acts["rowwise"], acts


def test_selective_recompute_fp8_activations_are_what_the_engines_layer_keeps(measured):
    for name, sp in (("sp", True), ("no_sp", False)):
        for recipe in ("tensorwise", "rowwise"):
            priced = per_layer("selective", sp, recipe) - per_layer("selective", sp)
            kept = measured["selective"][name]
            assert priced == kept[recipe] - kept["off"], (name, recipe, measured)


def test_bf16_activations_by_recomputation_are_what_the_engines_layer_keeps(measured):
    """Selective recomputation drops from each layer in flight what the core attention made: Q and K after
    RoPE (it applies RoPE itself), the log-sum-exp and the torch path's SDPA mask copy, and keeps a 4-byte
    mask type; the plan dropped only the mask copy, 13308 B a layer too many here, 85 MB per layer and
    micro-batch of POLAR-7B at TP2, 16384 tokens. Compared as none less selective: the norms' tensors, the
    same in both, are fp32 on CPU (torch's rms_norm upcasts there). Full recomputation keeps each layer's
    input alone."""
    for name, sp in (("sp", True), ("no_sp", False)):
        kept = {rc: measured[rc][name]["off"] for rc in ("none", "selective", "full")}
        dropped = per_layer("none", sp, backend="torch") - per_layer("selective", sp, backend="torch")
        assert dropped == kept["none"] - kept["selective"], (name, kept)
        assert per_layer("full", sp) == kept["full"], (name, kept)
