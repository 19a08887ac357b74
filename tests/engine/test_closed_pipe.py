"""engine/closed_pipe.py: output into a pipe whose reader has gone ends with exit code 1 and no traceback."""
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
