"""engine.profiling's CUDA parts, in one process on the GPU (the CPU parts: tests/engine/test_profiling.py):
train.profile=cuda opens and closes the CUDA profiler around the window, train.memory_snapshot dumps the
allocator's history of the window, torch.profiler's trace holds the window's kernels, and a step that
runs out of device memory dumps the snapshot of that moment before its error goes on."""
import json
import pickle

import pytest
import torch

from tests.engine.test_profiling import profiler_steps
from tests.engine.test_trainer import make_trainer

WINDOW = ("checkpoint.resume=false", "train.profile_start=2", "train.profile_end=4")


def said(lines) -> list[str]:
    return [x for x in lines if "profil" in x]


def trace_entries(path) -> list[dict]:
    snapshot = pickle.loads(path.read_bytes())
    return [e for device in snapshot["device_traces"] for e in device]


def test_cuda_mode_and_the_memory_snapshot_cover_the_window(runtime, tmp_path):
    lines = []
    make_trainer(runtime, tmp_path, *WINDOW, "train.profile=cuda", "train.memory_snapshot=true",
                 log=lambda *a, **k: lines.append(" ".join(map(str, a)))).fit()
    path = tmp_path / "profile" / "memory_rank0.pickle"
    assert said(lines) == [
        "profiling steps 2-3 on rank 0: the CUDA profiler (cudaProfilerStart, for nsys --capture-range=cudaProfilerApi)"
        " and the CUDA memory history",
        "profiling: stopped the CUDA profiler after step 3 on rank 0",
        f"profiling: wrote the CUDA memory snapshot of steps 2-3 on rank 0 to {path}",
    ], lines
    entries = trace_entries(path)
    assert any(e["action"] == "alloc" and e["frames"] for e in entries), entries[:5]  # with the stacks


def test_torch_mode_on_a_gpu_traces_the_kernels_of_the_window(runtime, tmp_path):
    make_trainer(runtime, tmp_path, *WINDOW, "train.profile=torch").fit()
    trace = tmp_path / "profile" / "rank0" / "steps_2-3.pt.trace.json"
    assert profiler_steps(trace) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("cat") == "kernel" for e in json.loads(trace.read_text())["traceEvents"])


def test_a_step_out_of_device_memory_dumps_the_snapshot_and_its_error_goes_on(runtime, tmp_path, monkeypatch):
    """The allocator may keep what it holds and 8 MiB more, less than the first step's activations (packs
    of 512 tokens, hidden size 512: tens of MiB). The step's torch.OutOfMemoryError reaches the caller
    with a note naming the snapshot, which holds the window's history up to the failed allocation."""
    from engine.data import PackedGroups
    from engine.progress import PEAK_ENV
    from tests.engine.dist_worker import random_groups

    monkeypatch.setenv(PEAK_ENV, "1000")  # the card's peak is not measured (a matmul) before the loop
    lines = []
    trainer = make_trainer(runtime, tmp_path, "checkpoint.resume=false", "train.memory_snapshot=true",
                           "train.profile_start=1", "train.profile_end=3", "model.hidden_size=512",
                           "model.ffn_hidden_size=2048", "model.num_attention_heads=8", "model.num_query_groups=2",
                           "data.seq_length=512", "model.max_position_embeddings=512",
                           log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    trainer.loader.source = PackedGroups(random_groups(3, 200, 64, 512), 512)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(runtime.device).total_memory
    allowed = torch.cuda.memory_reserved(runtime.device) + (8 << 20)
    torch.cuda.set_per_process_memory_fraction(allowed / total, runtime.device)
    try:
        with pytest.raises(torch.OutOfMemoryError) as err:
            trainer.fit()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, runtime.device)
        torch.cuda.empty_cache()
    path = tmp_path / "profile" / "memory_rank0_oom_step1.pickle"
    assert any(str(path) in note for note in getattr(err.value, "__notes__", ())), err.value
    assert f"profiling: out of memory in step 1: wrote the CUDA memory snapshot to {path}" in lines, lines
    assert any(e["action"] == "oom" for e in trace_entries(path))
    assert not (tmp_path / "profile" / "memory_rank0.pickle").exists()  # the window ended at the error
