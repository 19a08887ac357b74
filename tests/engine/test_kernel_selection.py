"""train.kernels and train.attention_backend: the Triton kernels (interpreted on CPU) train like the
torch path (the harness: tests/engine/parity.py), and every backend a machine cannot run is refused
at start-up, naming the setting."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.engine.parity import ATOL, NO_END_SAVE, ROOT, RTOL, WORKER, assert_same_run, run_layouts

# Interpreted Triton costs per program instance (query tiles x heads x layers x micro-batches): the
# harness's model with 2 layers instead of 4, trained its 4 steps of 2 micro-batches instead of 4, keeps every
# path of these tests (the kernels' forward in the loss, their backward in the grad norm, steps from
# updated weights) at a quarter of the programs. Its width stays: at 2 heads of width 32 the K
# projection's share of the grad norm was so small that a dK 1% off went unseen; here, as in the
# harness's run, it fails from step 2.
SMALL = ["model.num_layers=2", "train.global_batch=2", NO_END_SAVE]


RUNS = {
    "ref": [],  # the torch path
    "ref_infonce": ["train.loss=infonce"],
    "triton_pairwise": ["train.kernels=triton", "train.loss=pairwise"],
    "triton_infonce": ["train.kernels=triton", "train.loss=infonce"],
    "triton_attention": ["train.attention_backend=triton"],
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The SMALL runs, one after another in one process (parity.run_layouts), under TRITON_INTERPRET=1,
    which the torch path's runs pick no code by. No --init: every run seeds megatron's random states
    afresh as it starts (init_runtime) and builds its model from them, so each starts from the same
    weights (a difference would show as a step-1 mismatch). The Triton attention's run is not
    evaluated: its interpreted forward passes over all 60 groups would cost more than the training."""
    tmp = tmp_path_factory.mktemp("kernel_selection")
    return run_layouts(tmp, "kernels", 1, RUNS, *SMALL, no_eval=("triton_attention",),
                       extra_env={"TRITON_INTERPRET": "1"})


def assert_trains_alike(ref: dict, got: dict):
    assert_same_run(ref, got)
    # the evaluation's forward passes cover every layout of the 60 groups, not only the trained ones
    # (cheap here: the fused readout and loss are a few programs a micro-batch)
    assert got["eval"] == pytest.approx(ref["eval"], rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("loss", ["pairwise", "infonce"])
def test_triton_kernels_train_like_the_torch_reference(small, loss):
    """train.kernels=triton (fused readout and loss, interpreted on CPU) against the torch path."""
    assert_trains_alike(small["ref_infonce" if loss == "infonce" else "ref"], small[f"triton_{loss}"])


def test_triton_attention_trains_like_the_reference(small):
    """train.attention_backend=triton (the shared-prefix attention kernels, interpreted on CPU)
    inside megatron's layers, forward and backward, against the reference's attention: the path
    a GPU run takes (benchmarks/e2e.py, polar serve), checked before a GPU runs it."""
    assert_same_run(small["ref"], small["triton_attention"])


def test_triton_kernels_refused_without_gpu_or_interpreter(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(tmp_path / "x.json"),
                           f"run_dir={tmp_path / 'refused'}", "train.kernels=triton"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "train.kernels=triton needs a CUDA GPU" in proc.stderr


@pytest.mark.parametrize("overrides,interpret,message", [
    ({"kernels": "cuda"}, False, "train.kernels=cuda needs a CUDA GPU"),
    ({"kernels": "cuda"}, True, "train.kernels=cuda needs a CUDA GPU"),  # the interpreter is no CUDA
    ({"kernels": "fast"}, False, "expected torch, triton or cuda"),
    ({"attention_backend": "triton"}, False, "train.attention_backend=triton needs a CUDA GPU"),
    ({"attention_backend": "flash"}, False, "expected auto or one of blocks, torch, triton"),
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
        check_kernels(train, rt.is_cuda)
    else:
        with pytest.raises(ConfigError, match=message):
            check_kernels(train, rt.is_cuda)


def test_triton_attention_refuses_an_unsupported_head_dim_at_start_up(monkeypatch):
    import torch

    from engine.config import ConfigError, TrainConfig
    from engine.parallelize import check_kernels
    from engine.runtime import Runtime

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, pp=1, dp=1, vpp=None)
    check_kernels(TrainConfig(attention_backend="triton"), rt.is_cuda, head_dim=128)
    with pytest.raises(ConfigError, match="head dims 16, 32, 64, 128 and 256.* = 96"):
        check_kernels(TrainConfig(attention_backend="triton"), rt.is_cuda, head_dim=96)


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
        check_kernels(TrainConfig(kernels="cuda"), rt.is_cuda)


def test_auto_attention_is_triton_on_a_gpu_where_its_head_dims_fit_and_blocks_elsewhere(monkeypatch):
    from engine.config import TrainConfig
    import torch

    from engine.parallelize import check_kernels, resolve_attention_backend

    assert TrainConfig().attention_backend == "auto"
    assert resolve_attention_backend("auto", on_cuda=False, head_dim=64) == "blocks"
    # no GPU here: the card's compute capability is the one thing stood in for
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert resolve_attention_backend("auto", on_cuda=True, head_dim=64) == "triton"
    # a V100 / T4 (7.x): the Triton kernel refuses it, so auto must not pick it and stop the run
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert resolve_attention_backend("auto", on_cuda=True, head_dim=64) == "blocks"
    assert resolve_attention_backend("auto", on_cuda=True, head_dim=96) == "blocks"  # not a Triton head dim
    assert resolve_attention_backend("torch", on_cuda=True, head_dim=64) == "torch"  # asked for: kept
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_kernels(TrainConfig(), False, head_dim=96)  # auto on CPU: nothing to refuse
