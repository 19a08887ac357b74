"""Suite-wide pytest settings.

Under pytest-xdist (`-n 2 --dist loadfile`, the README's test command) each test file is one unit
of work, so a file's module-scoped fixtures (a reference run, a trained checkpoint) are built once.
One exception: tests/engine/kernels/ goes to one worker as a whole, because its isolation test
checks the very process in which the Triton-interpreter modules' child processes were started
(tests/engine/kernels/conftest.py orders it after them).

Files are handed out longest first (SLOWEST_FIRST): xdist's own order (most tests first) left the
files of one or two long multi-process tests to the end, with one worker idle while the other ran
them. Only the order depends on the list; a file missing from it runs after those in it.
"""
import os

import pytest

# One intra-op thread a process unless the caller chose: the command runs 2 workers on 2 cores, each starting
# launches of 2-4 processes, where torch's default (a thread per core in every process) only oversubscribes
# them (the convergence guard's single-process runs: 33 s of CPU at 2 threads, 25 s at 1, the same curve bit
# for bit). Set before any test imports torch, so the workers and every child process inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # xdist absent: plain sequential pytest, nothing to schedule
    LoadFileScheduling = None

KEPT_TOGETHER = ("tests/engine/kernels/",)

# Longest first: the times are estimates for the CI machine on a slow day (the run at d7dd3a3 took 35 min,
# 2026-12-06), scaled by each file's CPU before and after that day's sharing of launches (6862294-d580b47).
# Approximate: re-measure with `--durations=0` and reorder when a file changes its launches.
SLOWEST_FIRST = (
    "tests/polar/serve/test_server_process.py",  # ~110 s
    "tests/engine/test_score_interrupt.py",  # ~100 s (its signals' waits)
    "tests/polar/test_slurm_sigterm.py",  # ~95 s
    "tests/polar/test_cli.py",  # ~90 s (torchrun's restart)
    "tests/engine/test_stop_signal.py",  # ~80 s
    "tests/polar/convert/test_smollm2.py",  # ~80 s (the GGUF read once)
    "tests/benchmarks/test_fp8_benchmark.py",  # ~75 s
    "tests/test_gpu_run_all.py",  # ~70 s (its dry run and stages' sleeps)
    "tests/polar/test_plan.py",  # ~65 s
    "tests/engine/kernels/",  # ~80 s
    "tests/engine/test_multinode_restart.py",  # ~60 s
    "tests/engine/test_parallel_parity.py",  # ~60 s (one launch per world size)
    "tests/engine/test_parallel_resume.py",  # ~60 s (4 launches)
    "tests/polar/test_score.py",  # ~40 s
    "tests/engine/test_checkpoint_dir_lock.py",  # ~40 s (lock waits)
    "tests/engine/test_checkpoint_async.py",  # ~50 s (3 launches)
    "tests/polar/test_finetune.py",  # ~50 s (2 processes)
    "tests/polar/test_convergence.py",  # ~50 s
    "tests/engine/test_stop_signal_eval.py",  # ~50 s
    "tests/engine/test_score_chunks.py",  # ~45 s
    "tests/engine/test_eval_progress.py",  # ~40 s
    "tests/engine/test_checkpoint_async_layouts.py",  # ~40 s (2 launches)
    "tests/polar/test_reward_client_waits.py",  # ~20 s (loading-server waits, overload retries)
    "tests/engine/test_closed_pipe.py",
    "tests/engine/test_pretrain_cli.py",
    "tests/engine/test_trainer.py",
    "tests/engine/test_evaluation_read_ahead.py",
    "tests/test_package.py",
    "tests/polar/test_sample_robustness.py",
    "tests/polar/convert/test_architectures.py",
    "tests/benchmarks/test_e2e_benchmark.py",
    "tests/engine/test_kernel_selection.py",
    "tests/csrc/test_cuda_compile.py",
    "tests/engine/test_called_as.py",
    "tests/engine/launch/test_slurm_pretrain.py",
    "tests/engine/test_runtime.py",
    "tests/engine/test_parallel_fp8.py",
    "tests/engine/test_parallel_data.py",
    "tests/engine/test_score_split.py",
    "tests/polar/test_data_build_training.py",
    "tests/engine/test_profiling.py",
    "tests/engine/test_fp8_weight_cache.py",
    "tests/engine/test_fp8_training.py",
    "tests/engine/test_optim_fused_resume.py",
    "tests/polar/convert/test_card_serving.py",
    "tests/engine/test_resume_data_finetune.py",
    "tests/engine/test_checkpoint_rank0.py",
    "tests/engine/test_parameter_count.py",
    "tests/engine/test_score_packing.py",
    "tests/engine/test_megatron_jit.py",
    "tests/polar/serve/test_app.py",
    "tests/polar/serve/test_app_failures.py",
    "tests/polar/serve/test_reading_room.py",
    "tests/polar/test_cli_sigterm.py",
    "tests/engine/test_evaluate.py",
    "tests/polar/convert/test_lm_head.py",
    "tests/engine/test_config_checks.py",
    "tests/benchmarks/test_dataset_cold_index_benchmark.py",
    "tests/polar/convert/test_trained_export.py",
    "tests/benchmarks/test_dataset_cold_read_benchmark.py",
    "tests/benchmarks/test_benchmark_arguments.py",
)


def _unit(nodeid: str) -> str:
    for folder in KEPT_TOGETHER:
        if nodeid.startswith(folder):
            return folder
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(trylast=True)  # after tests/engine/kernels/conftest.py's order inside its folder
def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable: a file's order is kept

if LoadFileScheduling is not None:

    class _FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadfile":
            config.option.loadscopereorder = False  # hand files out in the collection's order (above)
            return _FileScheduling(config, log)
        return None  # any other --dist: xdist's own scheduler
