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
import pytest

try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # xdist absent: plain sequential pytest, nothing to schedule
    LoadFileScheduling = None

KEPT_TOGETHER = ("tests/engine/kernels/",)

# Longest first, from `pytest tests -n 2 --dist loadfile --durations=0` on 2 cores (the CI run at e6c9eb8,
# 2026-12-05), with the files whose launches were shared out that day (c669b45-9f9c6a8) at their new times
# measured alone (approximate: the machine was loaded).
SLOWEST_FIRST = (
    "tests/engine/test_parallel_resume.py",  # ~110 s (now also the foreach -> fused AdamW resumes)
    "tests/engine/test_checkpoint_async.py",  # ~90 s (was 177 s: 10 worker scenarios in one launch)
    "tests/polar/serve/test_server_process.py",  # ~83 s
    "tests/polar/test_plan.py",  # 81 s
    "tests/engine/test_parallel_parity.py",  # 78 s
    "tests/polar/test_cli.py",  # 130 s on 2026-12-06 (the machine slow that day: others 1.4-2x)
    "tests/engine/test_score_interrupt.py",  # 102 s the same run
    "tests/polar/test_finetune.py",  # 74 s
    "tests/polar/test_slurm_sigterm.py",  # ~70 s
    "tests/engine/test_stop_signal.py",  # ~65 s
    "tests/engine/kernels/",  # 64 s
    "tests/engine/test_multinode_restart.py",  # 64 s
    "tests/engine/test_checkpoint_async_layouts.py",  # ~56 s
    "tests/polar/convert/test_smollm2.py",  # 54 s
    "tests/engine/test_pretrain_cli.py",  # 52 s
    "tests/test_gpu_run_all.py",  # ~70 s with its dry run (2026-12-05, 28th session; the machine loaded)
    "tests/engine/test_trainer.py",  # ~48 s (the same run)
    "tests/engine/test_score_chunks.py",  # ~52 s (was 111 s)
    "tests/engine/test_parallel_data.py",  # 51 s
    "tests/polar/test_score.py",  # ~38 s
    "tests/engine/test_score_split.py",  # ~37 s
    "tests/polar/test_convergence.py",  # 38 s
    "tests/engine/test_checkpoint_rank0.py",  # 37 s
    "tests/engine/test_profiling.py",  # ~20 s (one torchrun DP2, the parity reference, 5 in-process fits)
    "tests/engine/test_kernel_selection.py",
    "tests/engine/test_parallel_fp8.py",
    "tests/engine/test_fp8_weight_cache.py",  # 9 trainings in 2 processes (7 in one, 2 in one torchrun)
    "tests/engine/test_optim_fused_resume.py",  # 1 layout (not distributed): a save and 2 resumes
    "tests/engine/test_evaluation_read_ahead.py",  # torchrun DP2xPP2 (2026-12-05)
    "tests/engine/test_score_packing.py",  # ~11 s
    "tests/polar/convert/test_card_serving.py",  # ~55 s (2026-12-05)
    "tests/engine/test_resume_data_finetune.py",  # ~40 s (2026-12-05)
    "tests/polar/test_data_build_training.py",  # split from test_data_build.py (its trainings): the rest is fast
    "tests/benchmarks/test_benchmark_arguments.py",
    "tests/engine/test_fp8_training.py",
    "tests/engine/test_megatron_jit.py",
    "tests/polar/serve/test_app.py",
    "tests/polar/serve/test_app_failures.py",  # split from test_app.py (2026-12-04): its later half
    "tests/polar/serve/test_reading_room.py",  # ~20 s (2026-12-05)
    "tests/polar/convert/test_architectures.py",
    "tests/test_package.py",
    "tests/polar/test_cli_sigterm.py",  # ~25 s (2026-12-05)
    "tests/benchmarks/test_fp8_benchmark.py",
    "tests/polar/test_reward.py",  # ~30 s (the same run)
    "tests/engine/test_called_as.py",  # ~30 s measured alone
    "tests/engine/launch/test_slurm_pretrain.py",  # ~29 s (the same run)
    "tests/engine/test_evaluate.py",
    "tests/csrc/test_cuda_compile.py",
    "tests/benchmarks/test_e2e_benchmark.py",
    "tests/polar/convert/test_lm_head.py",
    "tests/engine/test_config_checks.py",
    "tests/benchmarks/test_dataset_cold_index_benchmark.py",
    "tests/polar/convert/test_trained_export.py",
    "tests/benchmarks/test_dataset_cold_read_benchmark.py",
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
