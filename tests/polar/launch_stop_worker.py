"""A torchrun worker of tests/polar/test_launch.py (`-m tests.polar.launch_stop_worker DIR`): says it started,
then waits for the stop signal torchrun passes on and exits 143, as polar's entry points do. It starts no
process group (nothing to shut down)."""
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Path(sys.argv[1], f"started{os.environ['RANK']}").touch()
    time.sleep(300)
