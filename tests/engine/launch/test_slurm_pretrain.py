"""engine/launch/slurm_pretrain.sbatch without a cluster: `srun` and `scontrol` are stubs on PATH
that record the command, so the torchrun arguments each node's agent gets are checked here (the
launch itself is run on one machine by tests/engine/test_multinode_restart.py)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "engine" / "launch" / "slurm_pretrain.sbatch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # with STUB_RUN=answer, srun stands for a run that is asked to stop: it waits for the stop file and
    # removes it, as the trainer does once its checkpoint is saved; STUB_RUN=ignore runs to the end
    # without looking (a warning that came too late); STUB_RUN=worker runs the start-up of the first worker
    # (engine/pretrain.py --check-config: the lines a run prints before training) as torchrun would start it,
    # with the job's run id; it exits with STUB_EXIT (0). The file of start-up lines it was given goes to .said
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT.tmp"\n'
                                  'echo "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" '
                                  '>> "$STUB_OUT.tmp"\nmv "$STUB_OUT.tmp" "$STUB_OUT"\n'
                                  'echo "$POLAR_CHECKED_AT_LAUNCH" > "$STUB_OUT.said"\n'
                                  'if [ "${STUB_RUN:-}" = answer ]; then\n'
                                  '  for i in $(seq 200); do [ -e "$POLAR_STOP_FILE" ] && break; sleep 0.05; done\n'
                                  '  rm "$POLAR_STOP_FILE" || exit 7\n'
                                  'elif [ "${STUB_RUN:-}" = ignore ]; then sleep 1\n'
                                  'elif [ "${STUB_RUN:-}" = worker ]; then\n'
                                  '  args=("$@"); for i in "${!args[@]}"; do\n'
                                  '    [[ "${args[$i]}" == */engine/pretrain.py ]] && break; done\n'
                                  '  RANK=0 WORLD_SIZE=1 TORCHELASTIC_RUN_ID=$SLURM_JOB_ID "${args[4]}" "${args[@]:$i}"'
                                  ' --check-config || exit\nfi\n'
                                  'exit "${STUB_EXIT:-0}"\n')
    # the node list in two writes, as scontrol writes a long one: a reader that stops after the
    # first line makes the second write die of SIGPIPE; other commands (requeue) are recorded
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then\n'
                                      '  echo gpu-node-07\n  sleep 0.3\n  echo gpu-node-08\n'
                                      'else\n  echo "$@" >> "$STUB_OUT.scontrol"\nfi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _env(tmp_path: Path, slurm: bool = True, **env: str) -> tuple[dict, Path]:
    """(the script's environment: stubs first on PATH, a job's SLURM variables; the file where srun
    records its arguments), in a fresh `tmp_path`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "srun_args.txt"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "POLAR_REPO", "PYTHON"))}
    run_env.update(PATH=f"{_stubs(tmp_path)}:{os.environ['PATH']}", STUB_OUT=str(out),
                   POLAR_STOP_FILE=str(tmp_path / "STOP"), POLAR_CHECK_CONFIG="0")
    if slurm:
        run_env.update(SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-node-[07-08]",
                       SLURM_SUBMIT_DIR=str(ROOT), SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="96")
    run_env.update(env)
    return run_env, out


def _sbatch(tmp_path: Path, *args: str, slurm: bool = True, **env: str):
    """(the script's process, the arguments srun got or None), run in a fresh `tmp_path`."""
    run_env, out = _env(tmp_path, slurm, **env)
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=run_env, cwd=tmp_path,
                          timeout=60)
    return proc, out.read_text().splitlines() if out.is_file() else None


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_each_node_runs_one_torchrun_agent_at_the_first_nodes_rendezvous(tmp_path):
    """Also: the first node's name came from `scontrol ... | head -n 1`; scontrol writing the rest of
    a long node list after head had exited died of SIGPIPE, and pipefail with set -e ended the job
    there, silently (status 141)."""
    proc, argv = _sbatch(tmp_path, "--config", "polar_7b", "run_dir=/shared/runs/x", MAX_RESTARTS="5")
    assert proc.returncode == 0, proc.stderr
    # the agent's task holds the node's CPUs, unbound (srun no longer inherits sbatch's --cpus-per-task)
    assert argv[:5] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=96", "--cpu-bind=none", argv[4]]
    assert argv[5:7] == ["-m", "torch.distributed.run"]
    assert _after(argv, "--nnodes") == "2" and _after(argv, "--nproc-per-node") == "4"
    assert _after(argv, "--rdzv-backend") == "c10d" and _after(argv, "--rdzv-endpoint") == "gpu-node-07:29500"
    assert _after(argv, "--rdzv-id") == "4242" and _after(argv, "--max-restarts") == "5"
    assert "--rdzv-conf" not in argv  # torchrun's own timeouts unless RDZV_CONF is set
    entry = argv.index(str(ROOT / "engine" / "pretrain.py"))
    assert argv[entry + 1:-2] == ["--config", "polar_7b", "run_dir=/shared/runs/x"]
    assert argv[-2] == f"train.stop_file={tmp_path / 'STOP'}"  # where a SLURM warning asks the run to stop
    assert argv[-1] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    assert not (tmp_path / "srun_args.txt.scontrol").exists()  # no warning: no requeue
    # the repository's virtual environment (install.sh) when there is one, else python on PATH
    venv = ROOT / ".venv" / "bin" / "python"
    assert argv[4] == (str(venv) if os.access(venv, os.X_OK) else "python")
    _, argv = _sbatch(tmp_path / "own_python", PYTHON="/opt/py/bin/python3")
    assert argv[4] == "/opt/py/bin/python3"


def test_rdzv_conf_reaches_every_agents_torchrun_and_a_malformed_one_is_refused_before_srun(tmp_path):
    """Hundreds of nodes whose agents start minutes apart need torchrun's join and read timeouts raised; a value
    torchrun cannot read would fail every agent, 1 + MAX_RESTARTS times, inside its failure report."""
    proc, argv = _sbatch(tmp_path, "--config", "polar_7b", RDZV_CONF="join_timeout=1800,read_timeout=300")
    assert proc.returncode == 0, proc.stderr
    assert _after(argv, "--rdzv-conf") == "join_timeout=1800,read_timeout=300"
    assert argv.index("--rdzv-conf") < argv.index(str(ROOT / "engine" / "pretrain.py"))  # torchrun's, not the run's
    for bad in ("join_timeout", "join_timeout=1800,", "join_timeout=1800 read_timeout=300"):
        proc, argv = _sbatch(tmp_path / bad.replace(" ", "_").replace(",", "_"), RDZV_CONF=bad)
        assert proc.returncode == 2 and argv is None, (bad, proc.stderr)
        assert f"RDZV_CONF={bad}: torchrun's --rdzv-conf is KEY=VALUE" in proc.stderr, proc.stderr


def test_a_requeued_job_appends_to_its_log():
    """--requeue restarts the job under the same id, so the same %x-%j.out: SLURM's default open
    mode (truncate) erased the log of the attempt that failed."""
    header = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header and "#SBATCH --open-mode=append" in header


def test_outside_slurm_or_away_from_the_repository_it_says_what_to_do(tmp_path):
    """Run without sbatch it stopped at `SLURM_JOB_NODELIST: unbound variable`; submitted from
    another directory, every node's agent failed on a missing engine/pretrain.py."""
    proc, argv = _sbatch(tmp_path, slurm=False)
    assert proc.returncode == 2 and argv is None and "submit it with sbatch" in proc.stderr, proc.stderr
    proc, argv = _sbatch(tmp_path / "elsewhere", SLURM_SUBMIT_DIR=str(tmp_path))
    assert proc.returncode == 2 and argv is None, proc.stderr
    assert f"{tmp_path}/engine/pretrain.py not found" in proc.stderr and "POLAR_REPO" in proc.stderr
    proc, argv = _sbatch(tmp_path / "with_repo", SLURM_SUBMIT_DIR=str(tmp_path), POLAR_REPO=str(ROOT))
    assert proc.returncode == 0 and str(ROOT / "engine" / "pretrain.py") in argv, proc.stderr


def test_the_launchs_file_of_start_up_lines_is_absolute_and_an_earlier_attempts_is_removed(tmp_path):
    """The file the check and the workers keep their start-up lines in (POLAR_CHECKED_AT_LAUNCH): beside a
    relative POLAR_STOP_FILE its path was relative, which the engine ignores (every line twice again); a
    requeue after the batch node failed (no EXIT trap ran) left the earlier attempt's directory for good;
    a stop file's missing directory ended the job with mktemp's message, status 1."""
    (tmp_path / ".polar-launch-4242.old").mkdir(parents=True)  # an earlier attempt of this job
    (tmp_path / ".polar-launch-777.old").mkdir()  # another job's
    proc, argv = _sbatch(tmp_path, POLAR_STOP_FILE="STOP")
    assert proc.returncode == 0 and argv is not None, proc.stderr
    said = Path((tmp_path / "srun_args.txt.said").read_text().strip())
    assert said.is_absolute() and said.parent.parent == tmp_path and not said.parent.exists(), said
    assert sorted(p.name for p in tmp_path.glob(".polar-launch-*")) == [".polar-launch-777.old"]
    proc, argv = _sbatch(tmp_path / "missing", POLAR_STOP_FILE=str(tmp_path / "no" / "STOP"))
    assert proc.returncode == 2 and argv is None, proc.stderr
    assert f"POLAR_STOP_FILE={tmp_path / 'no' / 'STOP'}: its directory is missing" in proc.stderr, proc.stderr


def test_a_stop_file_setting_of_its_own_is_refused_for_the_variable_that_chooses_it(tmp_path):
    """The script appends train.stop_file=$POLAR_STOP_FILE after the user's settings, so one given on
    the command line was overridden without a word."""
    proc, argv = _sbatch(tmp_path, "run_dir=/shared/runs/x", "train.stop_file=/shared/stop")
    assert proc.returncode == 2 and argv is None, proc.stderr
    assert "train.stop_file=/shared/stop" in proc.stderr and "POLAR_STOP_FILE" in proc.stderr


def _warned(tmp_path: Path, run: str, **env: str):
    """The script under SLURM's USR1 warning, sent once srun (a stub doing `run`) has started: (its
    process, what it printed, the scontrol commands other than `show`)."""
    env, out = _env(tmp_path, STUB_RUN=run, **env)
    proc = subprocess.Popen(["bash", str(SCRIPT), "run_dir=/shared/runs/x"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    for _ in range(400):
        if out.exists():
            break
        time.sleep(0.025)
    proc.send_signal(signal.SIGUSR1)
    printed, _ = proc.communicate(timeout=60)
    recorded = tmp_path / "srun_args.txt.scontrol"
    return proc, printed, recorded.read_text().splitlines() if recorded.exists() else []


def test_a_slurm_warning_stops_the_run_through_its_stop_file_and_requeues_the_job(tmp_path):
    """--signal=B:USR1@600: SLURM warns the batch script before the time limit. The script touches the
    run's train.stop_file; the run (here a stub) saves, removes the file and exits 0; the job is
    requeued under its id and resumes from that checkpoint."""
    assert "#SBATCH --signal=B:USR1@600" in SCRIPT.read_text().splitlines()
    proc, printed, scontrol = _warned(tmp_path, "answer")
    assert proc.returncode == 0, printed
    assert "asking the run to save and stop" in printed and scontrol == ["requeue 4242"], printed
    assert not (tmp_path / "STOP").exists()


def test_a_warning_the_run_did_not_answer_is_no_requeue(tmp_path):
    """A run that ended without seeing the file (it finished its steps first) is not requeued, and
    the file is not left for the next job to stop at once."""
    proc, printed, scontrol = _warned(tmp_path, "ignore")
    assert proc.returncode == 0 and scontrol == [], printed
    assert not (tmp_path / "STOP").exists()


@pytest.mark.parametrize("posix", [False, True], ids=["bash", "posix_mode"])
def test_the_job_ends_with_the_runs_status_and_a_stop_answered_in_posix_mode_is_requeued(tmp_path, posix):
    """The script took srun's status from a second `wait` for its pid, after the one that had
    reaped it. Bash in POSIX mode (POSIXLY_CORRECT in the submitting shell's environment, which
    sbatch passes on) forgets a pid once waited for: that `wait` answered 127, so every job
    ended with 127 whatever the run did, and a run that had saved and stopped for SLURM's
    warning was not requeued."""
    mode = {"POSIXLY_CORRECT": "1"} if posix else {}
    proc, argv = _sbatch(tmp_path / "failed", STUB_EXIT="3", **mode)
    assert argv is not None and proc.returncode == 3, proc.stderr
    proc, argv = _sbatch(tmp_path / "done", **mode)
    assert argv is not None and proc.returncode == 0, proc.stderr
    proc, printed, scontrol = _warned(tmp_path / "warned", "answer", **mode)
    assert proc.returncode == 0 and scontrol == ["requeue 4242"], printed
    # a run that failed after the warning: its status, and no requeue
    proc, printed, scontrol = _warned(tmp_path / "warned_failed", "answer", STUB_EXIT="5", **mode)
    assert proc.returncode == 5 and scontrol == [], printed


def test_a_bad_setting_ends_the_job_before_any_agent_starts(tmp_path):
    """The start-up checks run once on the batch node before srun: a typo ends the job with its one
    `config error:` line and status 2; without the check every worker of every node failed with it,
    once per restart (MAX_RESTARTS rendezvous of all nodes), and the job ended with status 1."""
    proc, argv = _sbatch(tmp_path, "--config", "tiny_cpu", "train.stpes=3", POLAR_CHECK_CONFIG="1",
                         GPUS_PER_NODE="1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("unknown setting 'train.stpes'") == 1, proc.stderr
    assert argv is None  # srun never ran
    # a good configuration passes the check and the agents start, with the check's world size (2 nodes x 1)
    proc, argv = _sbatch(tmp_path / "good", "--config", "tiny_cpu", f"run_dir={tmp_path / 'run'}",
                         POLAR_CHECK_CONFIG="1", GPUS_PER_NODE="1")
    assert proc.returncode == 0, proc.stderr
    assert "config ok" in proc.stdout and "for 2 process(es)" in proc.stdout
    assert argv is not None and _after(argv, "--nproc-per-node") == "1"


def test_the_check_before_a_requeued_job_resumes_it_as_its_workers_would(tmp_path):
    """A requeued job (SLURM_RESTART_COUNT > 0) with checkpoint.resume=false resumes from the
    checkpoints it wrote itself, recognised by the job ids they record: SLURM's job id and torchrun's
    run id, which the script sets to the job id (--rdzv-id). The check on the batch node ran without
    torchrun's run id, took the checkpoints for another job's and ended the requeued job with
    'checkpoint.resume=false, but ... already holds checkpoints' before any agent started."""
    import sys

    run_dir = tmp_path / "run"
    small = [f"run_dir={run_dir}", "checkpoint.resume=false", "model.num_layers=1", "synthetic.train_triplets=64",
             "synthetic.eval_triplets=16", "synthetic.prompts=50", "train.steps=1", "train.warmup_steps=0",
             "log.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    first = subprocess.run([sys.executable, str(ROOT / "engine" / "pretrain.py"), *small], capture_output=True,
                           text=True, timeout=600, cwd=tmp_path,
                           env=dict(env, SLURM_JOB_ID="4242", TORCHELASTIC_RUN_ID="4242", OMP_NUM_THREADS="1"))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    proc, argv = _sbatch(tmp_path / "requeued", *small, POLAR_CHECK_CONFIG="1", SLURM_RESTART_COUNT="1",
                         SLURM_NNODES="1", GPUS_PER_NODE="1", STUB_RUN="worker")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "config ok" in proc.stdout and argv is not None  # the agents started
    # the resume note once in the job's log: the check said it, and the worker (here its start-up) said it again
    assert proc.stdout.count("this is a restart of the same job (SLURM_RESTART_COUNT=1;") == 1, proc.stdout
    # the file of the lines said: the workers' (srun's environment) is the check's, gone once the job ends
    said = Path((tmp_path / "requeued" / "srun_args.txt.said").read_text().strip())
    assert said.parent.parent == tmp_path / "requeued" and not said.parent.exists(), said
    # another job's checkpoints are still refused
    proc, argv = _sbatch(tmp_path / "other", *small, POLAR_CHECK_CONFIG="1", SLURM_RESTART_COUNT="1",
                         SLURM_NNODES="1", GPUS_PER_NODE="1", SLURM_JOB_ID="777")
    assert proc.returncode == 2 and "checkpoint.resume=false, but" in proc.stderr and argv is None, proc.stderr
