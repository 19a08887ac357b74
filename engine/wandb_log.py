"""Weights & Biases logging of a run's figures (log.wandb_project; the main rank only): the scalars
TensorBoard gets, at the same steps. wandb is optional (pip install wandb, or polar-rm[wandb]): a run that
names a project without it installed stops at start-up, on every rank alike (the setting's check). The
wandb run's id is kept in RUN_DIR/wandb_run_id, so the same command after a stop or a torchrun restart
continues the same wandb run (resume="allow") rather than starting a second one. A resume from before the
last step the stopped run logged logs those steps again; wandb keeps a run's steps increasing and ignores a log
to a step before its last, with a warning on every such call (a progress line's, an evaluation's: a resume 50
steps back at log.interval=1 printed 50 and more), so those steps are left out here, said once: each step is in
the run once, the steps up to the stopped run's last with its values (the losses a resume reproduces;
RUN_DIR/metrics.jsonl holds the resumed run's); the final evaluation of a start with nothing left to train (the
same command after the run finished) too. Offline (WANDB_MODE=offline), each start writes
RUN_DIR/wandb/offline-run-*-ID of its own steps, which `wandb sync` uploads to the one run: offline, a start
does not know the steps an earlier one logged."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from engine.setting_checks import ConfigError

RUN_ID_FILE = "wandb_run_id"
# characters wandb refuses in a project's or an entity's name
_FORBIDDEN = set("/\\#?%:")


def wandb_project(where, v):
    if not v:
        return
    if _FORBIDDEN & set(v) or not v.strip():
        raise ConfigError(f"{where}={v!r}: a wandb project's name may not be blank nor hold any of / \\ # ? % :")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{where}={v}: logging to Weights & Biases needs the package wandb, which is not "
                          f"installed: pip install wandb (or pip install 'polar-rm[wandb]'), or set {where}='' "
                          f"(off; RUN_DIR/metrics.jsonl has the same figures)")


wandb_project.rule = "empty (off), or a wandb project's name (needs the package wandb)"


def wandb_entity(where, v):
    if v and (_FORBIDDEN & set(v) or not v.strip()):
        raise ConfigError(f"{where}={v!r}: a wandb entity's name may not be blank nor hold any of / \\ # ? % :")


wandb_entity.rule = "empty (wandb's default entity), or a team's or user's name"


def wandb_name(where, v):
    if any(c < " " for c in v):
        raise ConfigError(f"{where}={v!r}: a run's name is one line of text (no control characters)")


wandb_name.rule = "empty (the run directory's name), or one line of text"


def run_id(run_dir: Path) -> str:
    """RUN_DIR's wandb run id: the one an earlier start of this run wrote, else a new one, written."""
    from engine import durable_file

    path = Path(run_dir) / RUN_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        import secrets
        import string

        # wandb's own ids are 8 of [a-z0-9]; its helper that makes them has moved between releases
        new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        durable_file.write_file(path, new + "\n")
        return new


class WandbLog:
    """One run's wandb logging; on an error from wandb (no API key, no network while online) says so once
    on stderr and logs no more: metrics.jsonl and TensorBoard keep the figures, and the run goes on."""

    def __init__(self, project: str, name: str, entity: str, run_dir, config: dict | None = None):
        self.run = None
        # the steps below it the wandb run holds from an earlier start: a resumed run's next step, its last
        # logged one + 1 (from the server; 0 for a new run, and offline)
        self.held = 0
        self.said_held = False
        try:
            import wandb

            self.run = wandb.init(
                project=project, entity=entity or None, name=name or Path(run_dir).resolve().name,
                id=run_id(run_dir), resume="allow", dir=str(run_dir), config=config,
                # the process's stdout and stderr stay its own (a closed pipe, a redirect): no console capture
                settings=wandb.Settings(console="off"))
            self.held = int(getattr(self.run, "starting_step", 0) or 0)
        except Exception as e:  # noqa: BLE001 - wandb's own errors are of many kinds; none should end the run
            self._failed(e)

    def log(self, values: dict, step: int) -> None:
        if self.run is None:
            return
        if step < self.held:
            self._say_held(step)
            return
        try:
            self.run.log(values, step=step)
        except Exception as e:  # noqa: BLE001
            self._failed(e)

    def _say_held(self, step: int) -> None:
        if self.said_held:
            return
        self.said_held = True
        last = self.held - 1
        steps = f"step {step} is" if step == last else f"steps {step}-{last} are"
        print(f"wandb: the run {self.run.id} holds steps up to {last}, logged by an earlier start, and keeps their "
              f"figures: this start's {steps} not logged there (wandb keeps a run's steps increasing; "
              f"RUN_DIR/metrics.jsonl has this start's)", flush=True)

    def _failed(self, e: Exception) -> None:
        run, self.run = self.run, None
        print(f"wandb: {type(e).__name__}: {e}: nothing more is logged to Weights & Biases; the run goes on "
              f"(RUN_DIR/metrics.jsonl has every figure; WANDB_MODE=offline logs without a network, for a later "
              f"`wandb sync`)", file=sys.stderr, flush=True)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def close(self, exit_code: int = 0) -> None:
        """`exit_code`: not 0 marks the wandb run failed (the run ended with an error)."""
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                self._failed(e)
