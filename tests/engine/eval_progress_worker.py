"""engine/pretrain.py with engine.evaluation.PROGRESS_S set to `--every` seconds, for
tests/engine/test_eval_progress.py: at 0 every evaluation batch prints its progress line, so the lines
the test reads depend on no timing."""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--every", type=float, required=True)
    args, rest = ap.parse_known_args()

    import engine.evaluation
    from engine.pretrain import main as pretrain

    engine.evaluation.PROGRESS_S = args.every
    return pretrain(rest)  # which ends with shutdown_runtime() on every rank


if __name__ == "__main__":
    sys.exit(main())
