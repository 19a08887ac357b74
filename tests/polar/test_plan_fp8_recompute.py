"""polar plan's FP8 activations under selective recomputation against what the engine's layer keeps.

megatron's selective recomputation checkpoints the core attention, which keeps its inputs and no output:
in bf16 the attention output is kept by linear_proj, the input it saves; the local per-tensor FP8 linear
keeps its e4m3 copy instead, so nothing keeps the bf16 output. Measured on the engine's bf16 layer at TP2
over gloo (tests/engine/model/fp8_sp_worker.py --layers --recompute selective: one layer's saved bytes as
2 layers less 1): per tensor keeps 20464 B less than bf16 with SP, 28656 B without, 8192 B (the bf16
attention output, 128 tokens x h/t 32 x 2 bytes) more than without recomputation, where the plan priced
the same difference as without recomputation.
"""
from __future__ import annotations

from polar import plan
from polar.plan_model import memory_per_rank
from tests.engine.model import fp8_sp_worker as worker


def test_selective_recompute_fp8_activations_are_what_the_engines_layer_keeps(tmp_path):
    measured = worker.launch(tmp_path / "layers", "--layers", "--recompute", "selective")[0]
    m = worker.MODEL

    def per_layer(sp: bool, recipe: str) -> float:
        """The plan's activation bytes for one more layer (the lone layer's stage-wide terms cancel)."""
        layout = plan.Layout(tp=worker.TP, pp=1, dp=1, micro_batch=worker.BATCH, recompute="selective",
                             sequence_parallel=sp)
        acts = []
        for layers in (1, 2):
            shape = plan.Shape(layers, m["hidden_size"], m["num_attention_heads"], m["num_query_groups"],
                               m["ffn_hidden_size"], m["vocab_size"])
            acts.append(memory_per_rank(shape, layout, worker.SEQ, worker.BATCH, 0, fp8=recipe != "off",
                                        fp8_inputs=plan.fp8_keeps_inputs(recipe))["activations"])
        return acts[1] - acts[0]

    for name, sp in (("sp", True), ("no_sp", False)):
        for recipe in ("tensorwise", "rowwise"):
            priced = per_layer(sp, recipe) - per_layer(sp, "off")
            assert priced == measured[name][recipe] - measured[name]["off"], (name, recipe, measured)
