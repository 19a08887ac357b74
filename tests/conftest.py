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

# Longest first, from `pytest tests -n 2 --dist loadfile --durations=0` on 2 cores (2026-12-04, b396f95).
SLOWEST_FIRST = (
    "tests/engine/test_checkpoint_async.py",  # added 2026-12-05 (231 s in that day's CI run, 1894 tests)
    "tests/engine/test_parallel_resume.py",
    "tests/polar/serve/test_server_process.py",
    "tests/polar/test_plan.py",
    "tests/engine/test_score_chunks.py",  # 110 s (2026-12-05)
    "tests/engine/test_checkpoint_async_layouts.py",  # 95 s (2026-12-05)
    "tests/engine/test_pretrain_cli.py",  # 135 s in the loaded CI run at 0fda42a (2026-12-05)
    "tests/polar/test_finetune.py",
    "tests/engine/test_parallel_parity.py",
    "tests/engine/test_stop_signal.py",  # 88 s (2026-12-05, 716803d)
    "tests/engine/test_stop_signal_eval.py",  # ~60 s (2026-12-05, d1f6a3c)
    "tests/engine/test_score_interrupt.py",  # 60-115 s on 2 cores (2026-12-05, 2eaea6f)
    "tests/polar/test_score.py",
    "tests/engine/test_parallel_data.py",
    "tests/polar/convert/test_smollm2.py",
    "tests/engine/test_multinode_restart.py",
    "tests/polar/test_slurm_sigterm.py",  # 75 s (2026-12-05, 0fda42a)
    "tests/engine/kernels/",
    "tests/engine/test_kernel_selection.py",
    "tests/engine/test_parallel_fp8.py",
    "tests/engine/test_fp8_weight_cache.py",  # 6 trainings in subprocesses, ~40-120 s (2026-12-05)
    "tests/engine/test_optim_fused_resume.py",  # 3 layouts saved and resumed (2026-12-05)
    "tests/engine/test_evaluation_read_ahead.py",  # torchrun DP2xPP2 (2026-12-05)
    "tests/engine/test_score_packing.py",  # a 960-line run killed and rerun (2026-12-05)
    "tests/polar/convert/test_card_serving.py",  # ~55 s (2026-12-05)
    "tests/engine/test_resume_data_finetune.py",  # ~40 s (2026-12-05)
    "tests/polar/test_convergence.py",
    "tests/engine/test_checkpoint_rank0.py",  # 41 s (2026-12-05, 716803d)
    "tests/polar/test_data_build_training.py",  # split from test_data_build.py (its trainings): the rest is fast
    "tests/benchmarks/test_benchmark_arguments.py",
    "tests/engine/test_score_split.py",
    "tests/engine/test_fp8_training.py",
    "tests/engine/test_megatron_jit.py",
    "tests/polar/serve/test_app.py",
    "tests/polar/serve/test_app_failures.py",  # split from test_app.py (2026-12-04): its later half
    "tests/polar/serve/test_reading_room.py",  # ~20 s (2026-12-05)
    "tests/polar/convert/test_architectures.py",
    "tests/test_package.py",
    "tests/polar/test_cli.py",
    "tests/polar/test_cli_sigterm.py",  # ~25 s (2026-12-05)
    "tests/benchmarks/test_fp8_benchmark.py",
    "tests/engine/test_trainer.py",
    "tests/test_gpu_run_all.py",
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
