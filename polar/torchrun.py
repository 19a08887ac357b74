"""torch's launcher (`python -m torch.distributed.run`) as polar pretrain, finetune, score and eval start it
for --nproc N, less one traceback: a stop signal polar passes on (polar.launch.call_forwarding_signals)
reaches the launcher's agent, which stops the workers (each says in one line what it kept: `interrupted by
SIGTERM: ...`, `stopped for SIGTERM at step ...`) and then raises SignalException out of torchrun's main,
whose traceback followed that line. It ends here with 128 + the signal, the status of a process the signal
stopped; any other failure (torchrun's report of a worker that failed) is left as torchrun prints it."""
from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun()  # reads sys.argv, as `python -m torch.distributed.run` does
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
