"""tests/engine/dist_worker.py's run with SIGTERM at a chosen point of it, for
tests/engine/test_stop_signal.py; each rank writes what Trainer.fit ended with to RESULT.rankN.

The hooks act in the loss of step --at-step (its first micro-batch): `--kill-ranks` send themselves
SIGTERM (`--repeat`: then note that the process still runs, RESULT.survivedN, send it again at once and
note that too, RESULT.repeatedN, and once more the repeat window later, engine.stop_signal.repeat_s(): read
from the environment here as by the trainer's handler); with `--wait` every rank
writes its pid to RESULT.readyN and waits there until it has received SIGTERM from outside; `--make-dir
PATH`: rank 0 makes a directory there. `--hold-save STEP`: the writer of that step's background save
waits for RESULT.release, which a rank makes once it received SIGTERM (a write still pending when it
came). `--kill-in-save STEP`: the `--kill-ranks` send themselves SIGTERM as that step's save begins
(instead of in a step's loss). `--thread-ranks` run fit in a thread other than the main one, where
fit cannot install its handler.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from tests.engine import dist_worker  # noqa: E402


def _install_hooks(trainer, args) -> None:
    import engine.stop_signal
    import engine.trainer
    from tests.engine.async_save_worker import _held_writer

    rank, real_loss, real_save, acted = trainer.rt.rank, engine.trainer.contrastive_loss, trainer.save, []

    def act() -> None:
        if rank in args.kill_ranks:
            os.kill(os.getpid(), signal.SIGTERM)
            if args.repeat:
                open(f"{args.result}.survived{rank}", "w").close()
                os.kill(os.getpid(), signal.SIGTERM)
                open(f"{args.result}.repeated{rank}", "w").close()
                time.sleep(engine.stop_signal.repeat_s() + 0.1)  # past the window: a sleep lasts at least this long
                os.kill(os.getpid(), signal.SIGTERM)
        if args.wait:
            with open(f"{args.result}.ready{rank}", "w") as f:
                f.write(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not trainer.stops.sigterm.received:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {rank}: no SIGTERM came within 300 s")
                time.sleep(0.05)
        if args.hold_save:
            open(f"{args.result}.release", "w").close()
        if args.make_dir and rank == 0:
            os.mkdir(args.make_dir)

    def loss(*a, **k):
        if trainer.step + 1 == args.at_step and not acted and not args.kill_in_save:
            acted.append(True)
            act()
        return real_loss(*a, **k)

    def save():
        if trainer.step == args.kill_in_save and rank in args.kill_ranks:
            os.kill(os.getpid(), signal.SIGTERM)
        if trainer.step == args.hold_save:
            _held_writer(f"{args.result}.release")
        return real_save()

    engine.trainer.contrastive_loss, trainer.save = loss, save


def _in_thread(fit, trainer):
    """fit(trainer) run in a thread of its own; its result, or its error raised here."""
    ended = {}

    def run():
        try:
            ended["result"] = fit(trainer)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            ended["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in ended:
        raise ended["error"]
    return ended["result"]


def _outcome(trainer, ended) -> dict:
    from engine import checkpoint

    out = {"latest": checkpoint.latest(trainer.ckpt_dir), "step": trainer.step,
           "partials": [p.name for p in checkpoint.partial_saves(trainer.ckpt_dir)]}
    if isinstance(ended, SystemExit):
        out["code"] = ended.code
    elif ended is not None:
        out["error"], out["type"] = str(ended), type(ended).__name__
    return out


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--result", required=True)
    ap.add_argument("--at-step", type=int, default=0)
    ap.add_argument("--kill-ranks", type=lambda s: [int(r) for r in s.split(",") if r], default=[])
    ap.add_argument("--repeat", action="store_true")
    ap.add_argument("--wait", action="store_true")
    ap.add_argument("--hold-save", type=int, default=0)
    ap.add_argument("--kill-in-save", type=int, default=0)
    ap.add_argument("--make-dir", default="")
    ap.add_argument("--thread-ranks", type=lambda s: [int(r) for r in s.split(",") if r], default=[])
    args, rest = ap.parse_known_args()
    sys.argv = [sys.argv[0], *rest]

    import engine.trainer
    from engine.runtime import released_on_error

    real_fit = engine.trainer.Trainer.fit

    def fit(trainer):
        _install_hooks(trainer, args)
        ended = None
        try:
            if trainer.rt.rank in args.thread_ranks:
                return _in_thread(real_fit, trainer)
            return real_fit(trainer)
        except BaseException as e:
            ended = e
            raise
        finally:
            with open(f"{args.result}.rank{trainer.rt.rank}", "w") as f:
                json.dump(_outcome(trainer, ended), f)

    engine.trainer.Trainer.fit = fit
    with released_on_error():  # as engine/pretrain.py ends a run that stops early (gloo aborts otherwise)
        dist_worker.main()


if __name__ == "__main__":
    main()
