"""engine/pretrain.py (its main, with the arguments after --scenario NAME --out PREFIX) met by a SIGTERM that
its main thread cannot take up, or after fit, for tests/engine/test_wandb_sigterm.py; the run logs to wandb
(the test sets WANDB_MODE=offline). engine.wandb_log.ANSWER_S is cut to 2 s. Scenarios:

stuck: rank 1 hangs in its loss of step 2 (a rank that failed without ending); rank 0's main thread goes on
    into the step's gradient collective and waits there, and a thread of rank 0 sends its process SIGTERM
    (as torchrun does when a worker fails) once the main thread has stayed for a second at one place inside
    torch.distributed. The test kills the run.
final: once rank 0 has begun its final evaluation (PREFIX.final0), rank 1's raises; rank 0's waits in Python
    for the SIGTERM torchrun sends the other workers when one fails (its error after 120 s without one).
graceful: one process sends itself SIGTERM in its loss of step 2; the save it stops with waits 3x ANSWER_S
    first: a stop the main thread took up, however long its save, is its own to close.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def _stuck_in_collective(frame) -> bool:
    while frame is not None:
        if f"torch{os.sep}distributed{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _signal_once_stuck() -> None:
    """SIGTERM to this process once its main thread has waited a second at one place in torch.distributed."""
    main = threading.main_thread().ident
    seen, since = None, time.monotonic()
    while True:
        frame = sys._current_frames().get(main)
        place = (frame, frame.f_lasti) if frame is not None and _stuck_in_collective(frame) else None
        if place is None or place != seen:
            seen, since = place, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)


def _install(scenario: str, prefix: str) -> None:
    import engine.trainer
    import engine.wandb_log

    engine.wandb_log.ANSWER_S = 2.0
    real_loss, real_evaluate, real_save = (engine.trainer.contrastive_loss, engine.trainer.Trainer.evaluate,
                                           engine.trainer.Trainer.save)
    trainers, acted = [], []

    def loss(*a, **k):
        trainer = trainers[-1]
        if trainer.step + 1 == 2 and not acted:
            acted.append(True)
            if scenario == "stuck" and trainer.rt.rank == 1:
                time.sleep(600)
            if scenario == "stuck" and trainer.rt.rank == 0:
                threading.Thread(target=_signal_once_stuck, daemon=True).start()
            if scenario == "graceful":
                os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a, **k)

    def evaluate(self, data):
        if scenario == "final" and not self.stops.running:  # the final evaluation
            if self.rt.rank == 0:
                open(f"{prefix}.final0", "w").close()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    time.sleep(0.1)
                raise RuntimeError("rank 0: no SIGTERM came within 120 s of rank 1's failure")
            while not os.path.exists(f"{prefix}.final0"):
                time.sleep(0.05)
            raise RuntimeError("rank 1 failed in its final evaluation")
        return real_evaluate(self, data)

    def save(self):
        if scenario == "graceful" and self.stops.sigterm.received:
            time.sleep(3 * engine.wandb_log.ANSWER_S)
        return real_save(self)

    real_init = engine.trainer.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        trainers.append(self)

    engine.trainer.contrastive_loss = loss
    engine.trainer.Trainer.evaluate, engine.trainer.Trainer.save = evaluate, save
    engine.trainer.Trainer.__init__ = init


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--scenario", choices=("stuck", "final", "graceful"), required=True)
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args()
    _install(args.scenario, args.out)
    from engine.pretrain import main as pretrain

    sys.exit(pretrain(rest))


if __name__ == "__main__":
    main()
