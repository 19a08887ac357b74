"""engine/closed_pipe.py: output into a pipe whose reader has gone ends with exit code 1 and no traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("call", [
    # `polar plan | head -1`
    "from polar import cli; sys.exit(cli.main(['plan', '--config', 'polar_7b', '--gpus', '64']))",
    # `engine/pretrain.py --print-config | head -1`
    "from engine.pretrain import main; sys.exit(main(['--print-config']))",
])
def test_output_into_a_closed_pipe_ends_without_a_traceback(call):
    # the reader is gone before the (buffered) output is written
    script = f"import os, sys\nr, w = os.pipe()\nos.close(r)\nos.dup2(w, 1)\n{call}\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr



@pytest.mark.parametrize("stdout", ["a pipe with its reader", "closed at the start"])
def test_a_broken_pipe_that_is_not_stdouts_is_raised_with_its_traceback(stdout):
    """engine/pretrain.py's and polar's main take a BrokenPipeError for a reader of stdout that left
    (reader_gone); one from another pipe (a background checkpoint writer's queue whose process died, a
    socket) ended the run with status 1, stdout silenced and not a word said. It is raised again; also
    where there is no stdout at all (`>&-`), which raised AttributeError over it."""
    script = ("import os, sys\nfrom engine.closed_pipe import reader_gone\ntry:\n"
              "    r, w = os.pipe()\n    os.close(r)\n    os.write(w, b'to a process that is gone')\n"
              "except BrokenPipeError:\n    sys.exit(reader_gone())\n")
    launcher = [] if stdout == "a pipe with its reader" else [
        sys.executable, "-c", "import os, subprocess, sys\nos.close(1)\nsys.exit(subprocess.call(sys.argv[1:]))"]
    proc = subprocess.run([*launcher, sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and 'File "<string>", line 6' in proc.stderr, proc.stderr  # the os.write
    assert proc.stderr.rstrip().endswith("BrokenPipeError: [Errno 32] Broken pipe"), proc.stderr
    assert "During handling" not in proc.stderr, proc.stderr


# a process that started the runtime (as training, polar score and evaluate do) and then writes progress
# lines and a summary, as Progress.log and the entry scripts do; it leaves a mark in a file once through
RUN_ON = """
import os, sys
from engine.config import ParallelConfig
from engine.progress import Progress
from engine.runtime import init_runtime, shutdown_runtime
rt = init_runtime(ParallelConfig(), seed=0)
progress = Progress(100, 0, True, None, None, 1)
for step in range(1, 4):
    progress.log(step, 0.5, 0.5, 1e-4, 1.0, 4096, 4000, 8, 1e9)
    print("a line on stderr", file=sys.stderr, flush=True)
sys.stdout.flush()
shutdown_runtime()
# a child (a spawned worker, a compiler run) has a stdout too, where this process's was closed at the start
import subprocess
child = subprocess.call([sys.executable, "-c", "import os; os.fstat(1)"], stderr=subprocess.DEVNULL)
open(sys.argv[1], "w").write("went on" if child == 0 else "a child without stdout")
"""


@pytest.mark.parametrize("streams", ["stdout on a full disk", "stdout and stderr", "stdout closed at the start"])
def test_a_run_goes_on_when_its_output_has_no_reader_or_no_room(tmp_path, streams):
    """`engine/pretrain.py ... | tee log` whose tee ended (the login that started it closed): the next
    progress line raised BrokenPipeError and ended the run of days (exit 1), for its log; a log file whose disk
    (or quota) filled up ended it with ENOSPC. Once the runtime is up the process goes on, its output into
    /dev/null, and exits 0 without a word about the flush at exit; also where stdout was closed when the
    process started (`>&-`: sys.stdout None, whose flush raised). A stdout given up is said once on stderr
    (a log that stops on a full disk is otherwise read as a run that hung)."""
    mark = tmp_path / "mark"
    no_reader = "r, w = os.pipe()\nos.close(r)\n"
    prelude = {"stdout on a full disk": "os.dup2(os.open('/dev/full', os.O_WRONLY), 1)\n",
               "stdout and stderr": no_reader + "os.dup2(w, 1)\nos.dup2(w, 2)\n",
               "stdout closed at the start": "os.close(1)\n"}[streams]
    # the closing happens before the runtime's Python starts, as a shell's redirection does
    launcher = (f"import os, subprocess, sys\n{prelude}"
                f"sys.exit(subprocess.call([sys.executable, '-c', {RUN_ON!r}, {str(mark)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert mark.read_text() == "went on"
    if "stderr" not in streams:
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.count("a line on stderr") == 3, proc.stderr[-3000:]
    if streams == "stdout on a full disk":
        note = "note: stdout (/dev/full) failed (No space left on device): the run goes on, its stdout from here"
        assert proc.stderr.count(note) == 1, proc.stderr[-3000:]
    else:
        assert "note: stdout" not in proc.stderr, proc.stderr[-3000:]


def test_a_stream_a_host_program_put_in_place_is_left_alone(monkeypatch):
    """init_runtime inside pytest (or a notebook) wrapped the host's capture stream, which the host
    later closed and replaced: every later print in the process wrote into a closed file (tests of
    `polar serve` errored at their first fixture). Only the process's own streams are wrapped."""
    import io
    import sys

    from engine.closed_pipe import outlive_lost_readers

    hosted = io.StringIO()
    monkeypatch.setattr(sys, "stdout", hosted)
    monkeypatch.setattr(sys, "stderr", hosted)
    outlive_lost_readers()
    assert sys.stdout is hosted and sys.stderr is hosted
