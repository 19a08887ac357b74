"""Parallel layouts against a single process: same initial weights, same global batches.

Each layout runs under torchrun over gloo and must reproduce the single-process loss and grad norm
of every optimizer step to fp32 rounding, and then evaluate to the single-process accuracy and loss.
The interleaved PP2 case is the layout where batched p2p over gloo silently corrupts gradients
(measured with megatron-core 0.16 and 0.19 on CPU: grad norm 1361 instead of 1.09, no error); it runs
with the engine's own settings, which turn batched p2p off on CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = WORKER.parents[2]
STEPS = 4
COMMON = [f"train.steps={STEPS}", "train.lr=1e-2", "train.warmup_steps=1"]
RTOL, ATOL = 2e-5, 1e-6


def run_worker(tmp: Path, name: str, nproc: int, *overrides: str, init: str | None = None,
               extra_env: dict | None = None) -> dict:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(WORKER), "--out", str(out), f"run_dir={tmp / name}", *COMMON, *overrides]
    if init:
        cmd[2:2] = ["--init", init]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra_env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text()) if out.exists() else {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    run_worker(tmp, "init", 1, "--save-init", str(tmp / "init"))
    init = str(tmp / "init")  # a checkpoint directory: init_from takes its newest step
    ref = run_worker(tmp, "ref", 1, init=init)
    return tmp, init, ref


def by_step(result: dict) -> dict:
    return {row["step"]: row for row in result["history"]}


def assert_same_run(ref: dict, got: dict, steps=range(1, STEPS + 1)):
    r, g = by_step(ref), by_step(got)
    for s in steps:
        assert g[s]["loss"] == pytest.approx(r[s]["loss"], rel=RTOL, abs=ATOL), f"loss at step {s}"
        assert g[s]["grad_norm"] == pytest.approx(r[s]["grad_norm"], rel=RTOL, abs=ATOL), f"grad norm at step {s}"
        assert g[s]["pair_acc"] == pytest.approx(r[s]["pair_acc"], abs=1e-9), f"pair accuracy at step {s}"


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
    "dp2_distributed_optimizer": (2, ["parallel.distributed_optimizer=true"]),
    # the worker's defaults keep the auxiliary LM loss on, so this also covers the LM head under SP
    "tp2_sequence_parallel": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    # memory and speed options change memory and time only: activation recomputation (selective:
    # our shared-prefix core attention runs again in the backward; full: whole layers), and DDP's
    # overlapped gradient reduce-scatter / parameter all-gather
    "recompute_selective": (1, ["train.recompute=selective"]),
    "recompute_full": (1, ["train.recompute=full"]),
    # TP x PP without interleaving, where pipeline stages exchange the sequence-sharded [s/tp, b, h]
    # activations, with full recomputation of whole layers on top (one 4-process run for three
    # features: each must be exact for the run to match)
    "tp2_pp2_sequence_parallel_recompute_full": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                                                     "train.recompute=full", "train.recompute_num_layers=2"]),
    "dp2_overlap_grad_reduce_and_param_gather": (2, ["parallel.overlap_grad_reduce=true",
                                                     "parallel.overlap_param_gather=true"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, name):
    tmp, init, ref = reference
    nproc, overrides = LAYOUTS[name]
    got = run_worker(tmp, name, nproc, *overrides, init=init)
    assert_same_run(ref, got)
    assert got["eval"]["pair_accuracy"] == pytest.approx(ref["eval"]["pair_accuracy"], abs=1e-9)
    assert got["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=RTOL)


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


@pytest.mark.parametrize(
    "name,nproc,overrides",
    [
        ("dp1_mb2", 1, ["train.micro_batch=2"]),  # 2 micro-batches of 2 sequences
        ("dp2_mb2", 2, ["train.micro_batch=2"]),  # 1 micro-batch per rank
        ("dp2_mb1_no_distopt", 2, ["parallel.distributed_optimizer=false"]),
    ],
)
def test_loss_is_mean_over_global_batch(reference, name, nproc, overrides):
    """Same global batch, split over DP ranks and micro-batches differently: same loss."""
    tmp, init, ref = reference
    assert_same_run(ref, run_worker(tmp, name, nproc, *overrides, init=init))


def test_resume_gives_the_uninterrupted_losses(reference):
    tmp, init, ref = reference
    run_worker(tmp, "resume", 1, "train.exit_at_step=2", init=init)
    resumed = run_worker(tmp, "resume", 1, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed)  # steps 1-2 from the checkpointed history, 3-4 after resuming
    assert resumed["start_step"] == 1 and len(resumed["history"]) == STEPS


def test_checkpoint_saved_at_tp2_resumes_at_tp1(reference):
    tmp, init, ref = reference
    run_worker(tmp, "reshard", 2, "parallel.tp=2", "train.exit_at_step=2", init=init)
    resumed = run_worker(tmp, "reshard", 1, "checkpoint.resume=true", init=init)
    assert_same_run(ref, resumed, steps=range(3, STEPS + 1))


@pytest.mark.parametrize("loss", ["pairwise", "infonce"])
def test_triton_kernels_train_like_the_torch_reference(reference, loss):
    """train.kernels=triton (fused readout and loss, interpreted on CPU) against the torch path."""
    tmp, init, ref = reference
    if loss == "infonce":
        ref = run_worker(tmp, "ref_infonce", 1, "train.loss=infonce", init=init)
    got = run_worker(tmp, f"triton_{loss}", 1, "train.kernels=triton", f"train.loss={loss}", init=init,
                     extra_env={"TRITON_INTERPRET": "1"})
    assert_same_run(ref, got)


def test_triton_kernels_refused_without_gpu_or_interpreter(reference):
    tmp, init, _ = reference
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(tmp / "x.json"), f"run_dir={tmp / 'refused'}",
                           "train.kernels=triton"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "train.kernels=triton needs a CUDA GPU" in proc.stderr


@pytest.mark.parametrize("overrides,interpret,message", [
    ({"kernels": "cuda"}, False, "train.kernels=cuda needs a CUDA GPU"),
    ({"kernels": "cuda"}, True, "train.kernels=cuda needs a CUDA GPU"),  # the interpreter is no CUDA
    ({"kernels": "fast"}, False, "expected torch, triton or cuda"),
    ({"attention_backend": "triton"}, False, "train.attention_backend=triton needs a CUDA GPU"),
    ({"attention_backend": "flash"}, False, "expected one of blocks, torch, triton"),
    ({"kernels": "triton", "attention_backend": "triton"}, True, None),
    ({}, False, None),
])
def test_check_kernels_on_cpu(monkeypatch, overrides, interpret, message):
    """check_kernels directly (no subprocess): every refusal names the setting; allowed ones pass."""
    import torch

    from engine.config import ConfigError, TrainConfig
    from engine.parallelize import check_kernels
    from engine.runtime import Runtime

    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, pp=1, dp=1, vpp=None)
    train = TrainConfig(**overrides)
    if message is None:
        check_kernels(train, rt)
    else:
        with pytest.raises(ConfigError, match=message):
            check_kernels(train, rt)


def test_triton_attention_refuses_an_unsupported_head_dim_at_start_up(monkeypatch):
    import torch

    from engine.config import ConfigError, TrainConfig
    from engine.parallelize import check_kernels
    from engine.runtime import Runtime

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, pp=1, dp=1, vpp=None)
    check_kernels(TrainConfig(attention_backend="triton"), rt, head_dim=128)
    with pytest.raises(ConfigError, match="head dims 16, 32, 64, 128 and 256.* = 96"):
        check_kernels(TrainConfig(attention_backend="triton"), rt, head_dim=96)


def test_check_kernels_cuda_without_build_says_how_to_build(monkeypatch):
    """On a CUDA runtime without engine._C_cuda the refusal carries the build command."""
    import importlib.util
    import sys as _sys

    import torch

    from engine.config import ConfigError, TrainConfig
    from engine.parallelize import check_kernels
    from engine.runtime import Runtime

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "engine._C_cuda" else real_find_spec(name, *a))
    monkeypatch.delitem(_sys.modules, "engine.kernels.cuda_ops", raising=False)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0), tp=1, pp=1, dp=1, vpp=None)
    with pytest.raises(ConfigError, match="POLAR_FORCE_CUDA_BUILD=1 python setup.py build_ext --inplace"):
        check_kernels(TrainConfig(kernels="cuda"), rt)


# FP8 (train.fp8, local linears): TP2 against one process, both in FP8, same initial weights. With
# the TP amax reductions every scale equals the single-process one, so step 1 (before any update)
# differs only by fp32 summation order: FP8_FIRST. Later steps differ more, for a stated reason: a
# summation-order difference of one fp32 ulp moves a value across an FP8 rounding boundary now and
# then (an e4m3 step is 2^-3 relative, an e5m2 step 2^-2), and Adam's first updates, about lr x
# sign(gradient), turn a changed sign of a near-zero gradient into a full lr-sized step. FP8_LATER
# bounds that (measured on this harness: tensorwise loss 4e-4, grad norm 6e-3 at step 4; rowwise
# 1e-7 and 5e-5). Without the TP amax reduction the per-tensor step-1 gradient norm moves by 3e-3
# (measured) and fails FP8_FIRST; per row, the power-of-two scales of a shard's rows happened to
# equal the whole rows' here, so this harness does not see a missing per-row reduction.
FP8_FIRST = dict(rel=1e-5, abs=1e-6)
FP8_LATER = {"loss": 2e-3, "grad_norm": 2e-2}


@pytest.fixture(scope="module")
def fp8_references(reference):
    tmp, init, _ = reference
    return {r: run_worker(tmp, f"fp8_{r}", 1, f"train.fp8={r}", init=init) for r in ("tensorwise", "rowwise")}


# each recipe under one TP layout: per tensor with TP alone (weights sharded, activations
# replicated), per row with sequence parallel (activations sharded too: the amax reductions matter)
@pytest.mark.parametrize("recipe,layout", [("tensorwise", ["parallel.tp=2"]),
                                           ("rowwise", ["parallel.tp=2", "parallel.sequence_parallel=true"])],
                         ids=["tensorwise-tp2", "rowwise-tp2_sequence_parallel"])
def test_fp8_tensor_parallel_matches_single_process_fp8(reference, fp8_references, recipe, layout):
    tmp, init, ref32 = reference
    ref = fp8_references[recipe]
    got = run_worker(tmp, f"fp8_{recipe}_tp2{'_sp' if len(layout) > 1 else ''}", 2, f"train.fp8={recipe}", *layout,
                     init=init)
    r, g = by_step(ref), by_step(got)
    assert g[1]["loss"] == pytest.approx(r[1]["loss"], **FP8_FIRST)
    assert g[1]["grad_norm"] == pytest.approx(r[1]["grad_norm"], **FP8_FIRST)
    for s in range(2, STEPS + 1):
        for key, rel in FP8_LATER.items():
            assert g[s][key] == pytest.approx(r[s][key], rel=rel), f"{key} at step {s}"
    # and FP8 is really on: its step-1 gradient norm differs from the fp32 run's
    assert abs(r[1]["grad_norm"] - by_step(ref32)[1]["grad_norm"]) > 5e-5 * r[1]["grad_norm"]
