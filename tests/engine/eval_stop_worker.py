"""engine/pretrain.py's run with SIGTERM sent from inside a periodic evaluation, for
tests/engine/test_stop_signal_eval.py (one process, or a rank under torchrun).

As the `--at-eval-batch`th evaluation batch of Trainer.fit on a rank begins (counted over every evaluation
and set of the run, from 1), before it runs: `--kill-ranks` send themselves SIGTERM, or rank 0 makes the
file `--touch` (train.stop_file). `--eval-sequences N`: each evaluation set inside fit is its first N
packed sequences (one batch is engine.evaluation.EVAL_CHUNK of them per rank). Each rank writes to
RESULT.rankN how fit ended ("code" of the SystemExit), the step it ended at, the evaluation batches fit
ran ("eval_batches"), and the newest complete checkpoint.

`--then` starts the next run's arguments: the runs go one after another in this process (start-up is
most of a run's time), each after a line `== run N ==` (rank 0's); a run before the last must end without a
SystemExit (a stop file's stop, not SIGTERM's, whose fit leaves SIGTERM ignored on its way out).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


class FirstSequences:
    """The first `n` packed sequences of an evaluation set (what engine.evaluation reads of one)."""

    def __init__(self, data, n: int):
        assert len(data) >= n, f"the evaluation set has {len(data)} packed sequences, fewer than {n}"
        self.data, self.n, self.seq_length = data, n, data.seq_length

    def __len__(self) -> int:
        return self.n

    def sequences(self, indices):
        return self.data.sequences(indices)


def main():
    runs, code = [[]], 0
    for arg in sys.argv[1:]:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    for n, argv in enumerate(runs):
        if os.environ.get("RANK", "0") == "0":
            print(f"== run {n} ==", flush=True)
        code = run(argv)
        if code:
            break
    return code


def run(argv: list):
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--result", required=True)
    ap.add_argument("--at-eval-batch", type=int, required=True)
    ap.add_argument("--kill-ranks", type=lambda s: [int(r) for r in s.split(",") if r], default=[])
    ap.add_argument("--touch", default="")
    ap.add_argument("--eval-sequences", type=int, default=0)
    args, rest = ap.parse_known_args(argv)

    import engine.trainer
    from engine import checkpoint
    from engine.pretrain import main as pretrain

    real_fit = getattr(engine.trainer.Trainer.fit, "real", engine.trainer.Trainer.fit)  # not an earlier run's

    def fit(trainer):
        rank, real_schedule, batches = trainer.rt.rank, trainer._run_schedule, []

        def schedule(microbatches, forward_only, *a, **k):
            if forward_only and trainer.stops.running:  # an evaluation inside fit
                batches.append(trainer.step)
                if len(batches) == args.at_eval_batch and rank in args.kill_ranks:
                    os.kill(os.getpid(), signal.SIGTERM)
                if len(batches) == args.at_eval_batch and rank == 0 and args.touch:
                    open(args.touch, "w").close()
            return real_schedule(microbatches, forward_only, *a, **k)

        trainer._run_schedule = schedule
        if args.eval_sequences:
            trainer.evals = {name: FirstSequences(data, args.eval_sequences) for name, data in trainer.evals.items()}
        out = {}
        try:
            return real_fit(trainer)
        except SystemExit as e:
            out["code"] = e.code
            raise
        finally:
            out.update(step=trainer.step, eval_batches=batches, latest=checkpoint.latest(trainer.ckpt_dir))
            with open(f"{args.result}.rank{rank}", "w") as f:
                json.dump(out, f)

    fit.real = real_fit
    engine.trainer.Trainer.fit = fit
    return pretrain(rest)


if __name__ == "__main__":
    sys.exit(main())
