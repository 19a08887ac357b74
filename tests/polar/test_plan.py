"""`polar plan` against the engine it plans for.

- Parameters per rank: the engine's model is built at TP1, TP2 (with sequence parallelism), PP2, PP2 with
  interleaving, TP2 x PP2 and TP2 x PP2 with the auxiliary LM head, in one torchrun world of 4 CPU
  processes; every rank's count must equal the plan's count for its pipeline position.
- Memory: a few training steps on CPU (fp32, gloo) of a model whose weights, gradients and Adam state
  dominate; the plan's estimate for that rank (polar.plan.memory_per_rank with fp32, the torch attention
  backend and no GPU allowance) must lie within 10% of the measured growth of resident memory from before
  the model is built to the peak of the later training steps (tests/polar/plan_worker.py says how).
- GPU measurements: a hand-made JSON of runs is printed with the prediction beside each measurement.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polar import cli, plan

WORKER = Path(__file__).with_name("plan_worker.py")
ROOT = WORKER.parents[2]

COUNT_MODEL = {"num_layers": 4, "hidden_size": 48, "num_attention_heads": 4, "num_query_groups": 2,
               "ffn_hidden_size": 80, "vocab_size": 100}
# model state (16 bytes per parameter at DP1 in fp32) dominates the activations of 128-token sequences
MEMORY_MODEL = {"num_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_query_groups": 4,
                "ffn_hidden_size": 1408, "vocab_size": 32000}
MEMORY_RUN = {"seq_length": 128, "global_batch": 2}


def _overrides(model: dict) -> list[str]:
    return [f"model.{k}={v}" for k, v in model.items()]


def _shape(model: dict, lm_head: bool = False) -> plan.Shape:
    return plan.Shape(model["num_layers"], model["hidden_size"], model["num_attention_heads"],
                      model["num_query_groups"], model["ffn_hidden_size"], model["vocab_size"], lm_head)


def _run(nproc: int, args: list[str], timeout: int = 900) -> None:
    cmd = [sys.executable, str(WORKER), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    # glibc keeps freed blocks above its (adaptive) mmap threshold in the heap; a fixed threshold returns
    # every tensor-sized block at free, so resident memory follows the live tensors
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_parameter_counts_per_rank_equal_the_engines_model(tmp_path):
    out = tmp_path / "counts.json"
    layouts = ["tp1", "tp2", "pp2", "pp2vpp2", "tp2pp2", "tp2pp2lm"]
    _run(4, ["counts", "--out", str(out), "--layouts", ",".join(layouts), *_overrides(COUNT_MODEL)])
    result = json.loads(out.read_text())
    assert sorted(result) == sorted(layouts)
    for name, got in result.items():
        shape = _shape(COUNT_MODEL, lm_head=name.endswith("lm"))
        assert len(got["ranks"]) == 4
        for r in got["ranks"]:
            expected = plan.params_per_rank(shape, got["tp"], got["pp"], r["pp_rank"])
            assert r["params"] == expected, f"{name}: rank {r}"
        # the plan's total is the model's: every (tp, pp) position once
        positions = {(r["tp_rank"], r["pp_rank"]): r["params"] for r in got["ranks"]}
        if got["tp"] == 1:
            assert sum(positions.values()) == plan.total_params(shape), name


MEMORY_LAYOUTS = {  # name -> (processes, parallel overrides, plan layout)
    "tp1": (1, [], plan.Layout(tp=1, pp=1, dp=1)),
    "dp2": (2, [], plan.Layout(tp=1, pp=1, dp=2)),
    "tp2": (2, ["parallel.tp=2"], plan.Layout(tp=2, pp=1, dp=1)),
    "pp2": (2, ["parallel.pp=2"], plan.Layout(tp=1, pp=2, dp=1)),
}


@pytest.mark.parametrize("name", sorted(MEMORY_LAYOUTS))
def test_memory_estimate_within_10_percent_of_cpu_peak(tmp_path, name):
    nproc, par, layout = MEMORY_LAYOUTS[name]
    out = tmp_path / "memory.json"
    run = [f"data.seq_length={MEMORY_RUN['seq_length']}", f"train.global_batch={MEMORY_RUN['global_batch']}",
           "train.aux_lm_weight=0", "train.attention_backend=torch", "log.tensorboard=false", "checkpoint.resume=false", f"run_dir={tmp_path / 'run'}"]
    _run(nproc, ["memory", "--out", str(out), *_overrides(MEMORY_MODEL), *run, *par])
    shape = _shape(MEMORY_MODEL)
    for r in json.loads(out.read_text()):
        est = plan.memory_per_rank(shape, layout, MEMORY_RUN["seq_length"], MEMORY_RUN["global_batch"],
                                   r["pp_rank"], precision="fp32", attention_backend="torch", device="cpu")
        ratio = est["total"] / r["peak_bytes"]
        print(f"{name} rank {r['rank']}: estimate {est['total'] / 1e6:.1f} MB, "
              f"measured peak {r['peak_bytes'] / 1e6:.1f} MB "
              f"(state {r['state_bytes'] / 1e6:.1f} MB), ratio {ratio:.3f}; {est}")
        assert abs(ratio - 1) <= 0.10, (name, r, est)


def test_measured_gpu_runs_are_printed_beside_their_predictions(tmp_path, capsys):
    runs = [
        {"name": "7b-tp4", "config": "polar_7b", "overrides": ["train.global_batch=256"], "gpu": "H100", "gpus": 64,
         "layout": {"tp": 4, "pp": 1, "micro_batch": 1}, "peak_memory_gb": 50.0, "step_time_s": 9.5, "mfu": 0.38},
        {"name": "1.8b-pp2", "config": "polar_1_8b", "gpu": "H200", "gpus": 16,
         "layout": {"tp": 2, "pp": 2, "vpp": 2, "recompute": "full"}, "step_time_s": 40.0},
    ]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    assert plan.main(["--measured", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[2:]}
    assert set(rows) == {"7b-tp4", "1.8b-pp2"}

    a = plan.Assumptions()
    cfg = plan.load_plan_config("polar_7b", ["train.global_batch=256"])
    e = plan.estimate(plan.shape_from_config(cfg), plan.Layout(tp=4, pp=1, dp=16, sequence_parallel=True), 16384,
                      256, plan.GPUS["H100"], a, attention_backend=cfg.train.attention_backend)
    row = rows["7b-tp4"]
    assert "TP4xPP1xDP16" in row
    assert f"{e.memory['total'] / 1e9:.1f} / 50.0 ({e.memory['total'] / 1e9 / 50.0 - 1:+.0%})" in row
    assert f"{e.time['total']:.2f} / 9.50" in row
    assert f"{e.time['mfu'] * 100:.1f} / 38.0" in row
    assert "TP2xPP2xVPP2xDP4 mb1 rc-full" in rows["1.8b-pp2"] and "/ 40.00" in rows["1.8b-pp2"]
    assert " / -" in rows["1.8b-pp2"]  # memory was not measured there


def test_a_bad_measurement_file_is_named(tmp_path, capsys):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps([{"config": "polar_7b", "gpu": "H100", "gpus": 64, "layout": {"tp": 3, "pp": 1}}]))
    assert plan.main(["--measured", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "run 0" in err


def test_every_candidate_is_a_layout_the_engine_accepts():
    from engine.config import ParallelConfig, TrainConfig
    from engine.runtime import validate_layout

    cfg = plan.load_plan_config("polar_7b", ["train.global_batch=64"])
    shape = plan.shape_from_config(cfg)
    layouts = plan.candidate_layouts(shape, 32, 64, cfg.data.seq_length, 8)
    assert {(lay.tp, lay.pp) for lay in layouts} >= {(1, 1), (2, 2), (4, 4), (8, 4)}
    assert any(lay.vpp for lay in layouts)
    for lay in layouts:
        par = ParallelConfig(tp=lay.tp, pp=lay.pp, vpp=lay.vpp, sequence_parallel=lay.sequence_parallel)
        train = TrainConfig(global_batch=64, micro_batch=lay.micro_batch)
        assert validate_layout(cfg.model, par, train, 32, cfg.data.seq_length) == lay.dp


def test_recomputation_trades_time_for_activation_memory():
    cfg = plan.load_plan_config("polar_7b", [])
    shape = plan.shape_from_config(cfg)
    base = plan.Layout(tp=2, pp=4, dp=8, sequence_parallel=True)
    acts = plan.activation_bytes_by_recompute(shape, base, 16384, 2048, 0)
    assert acts["full"] < acts["selective"] <= acts["none"]
    times = {rc: plan.step_time(shape, plan.Layout(tp=2, pp=4, dp=8, recompute=rc, sequence_parallel=True), 16384,
                                2048, plan.GPUS["H100"], plan.Assumptions())["total"] for rc in acts}
    assert times["none"] < times["selective"] < times["full"]
    # interleaving shrinks the bubble and holds more micro-batches in flight on the first stage
    inter = plan.Layout(tp=2, pp=4, dp=8, vpp=2, sequence_parallel=True)
    t0 = plan.step_time(shape, base, 16384, 2048, plan.GPUS["H100"], plan.Assumptions())
    t1 = plan.step_time(shape, inter, 16384, 2048, plan.GPUS["H100"], plan.Assumptions())
    assert t1["bubble"] == pytest.approx(t0["bubble"] / 2)
    assert plan.layers_in_flight(shape, inter, 0, 64) > plan.layers_in_flight(shape, base, 0, 64)


def test_plan_for_polar_7b_recommends_a_layout_that_fits(capsys):
    assert cli.main(["plan", "--config", "polar_7b", "--gpu", "H100", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "recommended: " in out and "launch with: parallel.tp=" in out
    assert "assumed: compute at 50% of the dense bf16 peak" in out


def test_a_gpu_count_no_layout_divides_names_the_nearest_batches(capsys):
    # 912 = 16 x 57: no data-parallel size of 912 GPUs divides 2048
    assert plan.main(["--config", "polar_7b", "--gpus", "912"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch=2048" in err and "nearest global batches with layouts: 1995 and 2052" in err


def test_fp8_is_refused_on_a_card_without_it(capsys):
    assert plan.main(["--config", "polar_1_8b", "--gpu", "A100", "--gpus", "8", "--fp8"]) == 2
    assert "A100 has no FP8" in capsys.readouterr().err
