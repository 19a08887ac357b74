import pytest

from engine.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from engine.runtime import validate_layout


@pytest.mark.parametrize("hidden,heads", [(30, 2), (96, 32)])
def test_an_odd_head_dimension_is_refused_at_start_up(hidden, heads):
    """Rotary embeddings rotate channel pairs: an odd head dimension used to fail in the first
    forward pass with a tensor-size mismatch; it is refused before any process builds a model."""
    model = ModelConfig(hidden_size=hidden, num_attention_heads=heads, num_query_groups=heads)
    with pytest.raises(ConfigError, match=rf"model.hidden_size={hidden} / model.num_attention_heads={heads}"):
        validate_layout(model, ParallelConfig(), TrainConfig(), 1, 1024)
    validate_layout(ModelConfig(hidden_size=hidden + heads, num_attention_heads=heads, num_query_groups=heads),
                    ParallelConfig(), TrainConfig(), 1, 1024)


@pytest.fixture(scope="module")
def runtime_child():
    """One process (a process group of its own, started and ended) serving two tests: it starts the runtime
    inside released_on_error with parallel.timeout_minutes=7, prints every group's timeout, then fails.
    Starting python, torch and megatron is most of its time, so one start serves both."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import warnings; warnings.filterwarnings('ignore')\n"
              "import torch, torch.distributed as dist\n"
              "from engine.config import ParallelConfig\n"
              "from engine.runtime import init_runtime, released_on_error\n"
              "try:\n"
              "    with released_on_error():\n"
              "        rt = init_runtime(ParallelConfig(timeout_minutes=7), seed=1)\n"
              "        assert dist.is_initialized()\n"
              "        cpu = torch.device('cpu')\n"
              "        groups = [dist.distributed_c10d._get_default_group(), rt.groups.tp, rt.groups.dp,\n"
              "                  rt.groups.pp]\n"
              "        print('timeouts', sorted({g._get_backend(cpu).options._timeout.total_seconds()\n"
              "                                  for g in groups}))\n"
              "        raise KeyError('x')\n"
              "except KeyError:\n"
              "    pass\n"
              "print('initialised after the block:', dist.is_initialized())\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])


def test_parallel_timeout_reaches_every_process_group(runtime_child):
    """torch's default (10 min) on the world group ended saves and data preparation that take longer
    at scale while megatron's own groups waited 30 min; parallel.timeout_minutes sets them all."""
    proc = runtime_child
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "timeouts [420.0]" in proc.stdout.splitlines(), proc.stdout


def test_llama3_rope_needs_a_high_frequency_factor_above_the_low_one():
    # the scaling blends over (L / wavelength - low) / (high - low): equal factors divide by zero
    model = ModelConfig(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=4.0)
    with pytest.raises(ConfigError, match="model.rope_high_freq_factor=4.0 must be more than model.rope_low_freq"):
        validate_layout(model, ParallelConfig(), TrainConfig(), 1, 128)
    assert validate_layout(ModelConfig(rope_scaling="llama3"), ParallelConfig(), TrainConfig(), 1, 128) == 1


def test_groups_are_released_on_error_only_where_the_block_started_them(runtime, runtime_child):
    """An entry point that failed after starting the process groups ends them (left to the
    interpreter's exit, gloo sometimes aborted it with exit -6 after the error was printed); groups
    that were up before it started (this test session's) are not its to end."""
    import torch.distributed as dist

    from engine.runtime import released_on_error

    with pytest.raises(KeyError), released_on_error():
        raise KeyError("an error inside an entry point's run")
    assert dist.is_initialized()
    # one that started them ends them (runtime_child: init_runtime inside the block, then a KeyError)
    proc = runtime_child
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "initialised after the block: False", proc.stdout


@pytest.mark.parametrize("settings,message", [
    ({"rope_beta_fast": 1.0, "rope_beta_slow": 2.0},
     r"model.rope_beta_fast=1.0 must be at least model.rope_beta_slow=2.0"),
    ({"rope_mscale": 0.7}, r"model.rope_mscale is set without the other of model.rope_mscale and "),
    ({"rope_mscale_all_dim": 1.0}, r"model.rope_mscale_all_dim is set without the other"),
    ({"rope_attention_factor": 1.2, "rope_mscale": 0.7, "rope_mscale_all_dim": 1.0},
     r"model.rope_attention_factor=1.2 is set, and so are model.rope_mscale and model.rope_mscale_all_dim"),
])
def test_yarn_settings_that_transformers_would_run_backwards_or_ignore_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(ModelConfig(rope_scaling="yarn", **settings), ParallelConfig(), TrainConfig(), 1, 128)
    # the same settings mean nothing to another scaling, and the pair or equal betas are fine for yarn
    assert validate_layout(ModelConfig(**settings), ParallelConfig(), TrainConfig(), 1, 128) == 1
    fine = ModelConfig(rope_scaling="yarn", rope_beta_fast=2.0, rope_beta_slow=2.0, rope_mscale=0.7,
                       rope_mscale_all_dim=1.0)
    assert validate_layout(fine, ParallelConfig(), TrainConfig(), 1, 128) == 1


def test_torchruns_workers_save_and_end_when_it_is_killed(tmp_path):
    """torchrun starts each worker in a session of its own: a `kill -9` of it (or of `polar pretrain`
    above it) left the ranks training and saving on, re-parented to PID 1, and a relaunch then met
    them in its checkpoint directory. They now get SIGTERM when torchrun ends, and stop as for any
    SIGTERM: the step reached saved, exit 143."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    root = Path(__file__).resolve().parents[2]
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "engine" / "pretrain.py"), f"run_dir={run_dir}", "train.steps=100000", "model.num_layers=1",
           "synthetic.train_triplets=64", "synthetic.eval_triplets=16", "synthetic.prompts=50", "log.interval=1",
           "log.tensorboard=false"]
    with open(log, "w") as f:
        torchrun = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    workers = []
    try:
        while torchrun.poll() is None and "step      1/" not in log.read_text():  # training under way
            time.sleep(0.5)
        workers = psutil.Process(torchrun.pid).children()
        assert len(workers) == 2, log.read_text()[-3000:]
        torchrun.kill()
        torchrun.wait()
        # bounded: a worker left running fails the test here (and is killed) instead of hanging it
        _, alive = psutil.wait_procs(workers, timeout=240)
        assert not alive, f"workers {[p.pid for p in alive]} outlived torchrun:\n{log.read_text()[-3000:]}"
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
    out = log.read_text()
    assert "SIGTERM received (by 2 of 2 rank(s))" in out, out[-3000:]
    step = (run_dir / "checkpoints" / "latest").read_text()
    assert f"the checkpoint {run_dir / 'checkpoints' / step} is complete; exiting with status 143" in out, out[-3000:]


@pytest.mark.skipif(not __import__("shutil").which("unshare"), reason="needs util-linux unshare")
def test_a_worker_of_a_launcher_that_is_pid_1_keeps_running(tmp_path):
    """torchrun as a container's first process (`docker run IMAGE torchrun ...`, a Kubernetes pod whose
    command is torchrun) is PID 1, so its workers' parent is 1 from the start: end_with_launcher took
    that for a launcher already gone and sent the worker SIGTERM, so every rank ended in init_runtime.
    Here a PID namespace makes the launcher PID 1 (as root, or through a user namespace)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    worker = ("import os, sys; sys.path.insert(0, sys.argv[1]); from engine.runtime import end_with_launcher; "
              "assert os.getppid() == 1; print('asked', end_with_launcher(), flush=True)")
    launcher = ("import os, subprocess, sys; assert os.getpid() == 1; "
                "env = dict(os.environ, TORCHELASTIC_RUN_ID='pid1'); "
                "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]], env=env).returncode)")
    for userns in ([], ["--user", "--map-root-user"]):
        proc = subprocess.run(["unshare", *userns, "--pid", "--fork", "--mount-proc", sys.executable, "-c", launcher,
                               worker, str(root)], capture_output=True, text=True, timeout=120)
        if "Operation not permitted" not in proc.stderr:
            break
    else:
        pytest.skip(f"no PID namespace here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0 and "asked True" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])
