"""What `polar plan` prints of its ranked layouts (polar/plan_report.py): the recommendation and its
checkpoint cost for POLAR-7B, and a table whose columns stay aligned for the longest layout name."""
from __future__ import annotations

from polar import cli, plan


def test_plan_for_polar_7b_recommends_a_layout_that_fits(capsys):
    assert cli.main(["plan", "--config", "polar_7b", "--gpu", "H100", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "recommended: " in out and "launch with: parallel.tp=" in out
    assert "assumed: compute at 50% of the dense bf16 peak" in out
    # the recommended TP2xPP1xDP32 (since megatron's fused SwiGLU keeps 3 ffn-wide tensors a layer, not 5):
    # 7.36 B parameters, 14 bytes each; every replica gathers its shard's state
    assert "recommended: TP2xPP1xDP32 " in out
    c = plan.checkpoint_bytes(plan.Shape(32, 4096, 32, 8, 14336, 92544), plan.Layout(2, 1, 32), gpus_per_node=8)
    assert f"checkpoint: {c['step'] / plan.GB:.1f} GB a step" in out and 100 * plan.GB < c["step"] < 105 * plan.GB
    assert f"a resume reads {32 * c['optimizer'] / 1000 / plan.GB:.1f} TB in all" in out


def test_the_table_keeps_its_columns_for_the_longest_layout_name(capsys):
    """A name longer than the layout column ("TP2xPP2xVPP2xDP16 mb1 rc-selective") pushed its row's
    later columns one place right."""
    assert cli.main(["plan", "--config", "polar_7b", "--gpus", "64", "train.attention_backend=triton",
                     "--top", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("# layout"))
    table = lines[start:start + 2] + [line for line in lines[start + 2:] if line[:3].strip().isdigit()]
    assert any("VPP" in line and "rc-selective" in line for line in table)  # the long names are there
    assert len({len(line) for line in table}) == 1, sorted({len(line) for line in table})
