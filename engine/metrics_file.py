"""RUN_DIR/metrics.jsonl: the run's figures as any tracker can read them, one JSON object a line, written
by the main rank. A line per progress window ("kind": "train": the figures of the progress line and of
TensorBoard) and per periodic evaluation of a set ("kind": "eval", "set": its name), and the final
evaluation the entry script runs after training, a line per set marked "final": true at the last trained step
(none where a stop file or SIGTERM stopped the run: it skips that evaluation). Each line is flushed as it is
written, so a killed run keeps every line it wrote; a line cut short by the kill is dropped by the next
reader. A resumed run trains the steps after its checkpoint again: their lines, which the stopped run wrote,
are dropped when it opens the file (as TensorBoard's purge_step drops its scalars), so a resumed run's file
holds each step once; the final lines of an earlier start go too (the resumed run writes its own), so the
file holds at most one final line per set, those of summary.json's "evaluations". A run stopped by a time
limit or exit_at_step at an evaluation step has that step's periodic line and a final line of the same
figures (the final evaluation takes the periodic result rather than evaluating the same weights again)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

NAME = "metrics.jsonl"


def read(path, note=None) -> list[dict]:
    """The file's objects in order. A line that is not a whole JSON object (the last one cut short by a
    kill, as no other is written partly) is dropped, and `note` (a callable taking a line of text) told
    so; a missing file holds none."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif note:
            note(f"{path}: line {number} is not a whole JSON object (a write cut short by a kill): dropped")
    return rows


def _json_safe(value):
    # a non-finite figure (a skipped step's grad norm) is null: NaN and Infinity are no JSON, and strict
    # readers (jq, JavaScript's JSON.parse) refuse the whole line
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsFile:
    """The main rank's writer; `start_step` is the step the run trains on from (its checkpoint's, 0 for a
    new run): lines of later steps are dropped at once, the file rewritten atomically (a kill during the
    rewrite leaves the old file whole). A write that fails (a full disk) is said once on stderr and ends
    the file's lines, not the run, as TensorBoard's writer's does (engine/progress.py)."""

    def __init__(self, path, start_step: int):
        self.path = Path(path)
        self.file = None
        try:
            self._keep_until(start_step)
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            self._failed(e)

    def _keep_until(self, step: int) -> None:
        if not self.path.exists():
            return
        torn: list[str] = []
        rows = read(self.path, torn.append)
        # a final line is a finished start's result: a start that resumes at that very step (nothing left to
        # train) evaluates the same weights again, a longer one at a later step
        kept = [r for r in rows if not r.get("final") and (not isinstance(r.get("step"), (int, float))
                                                           or r["step"] <= step)]
        if torn or len(kept) < len(rows):
            from engine import durable_file

            for line in torn:
                print(line, file=sys.stderr, flush=True)
            durable_file.write_file(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        line = json.dumps({k: _json_safe(v) for k, v in row.items()}, allow_nan=False)
        try:
            self.file.write(line + "\n")
            self.file.flush()  # in the OS's hands: a killed process keeps it
        except OSError as e:
            self._failed(e)

    def train(self, row: dict) -> None:
        """A progress window's row (engine.progress.Progress.log's)."""
        self.write({"kind": "train", "step": row["step"], "time": time.time(),
                    **{k: v for k, v in row.items() if k != "step"}})

    def eval(self, step: int, name: str, result: dict, final: bool = False) -> None:
        """A set's evaluation result at `step` (engine.evaluation.evaluate's figures); `final`: the run's
        final evaluation, marked "final": true."""
        self.write({"kind": "eval", "set": name, "step": step, **({"final": True} if final else {}),
                    "time": time.time(), **result})

    def _failed(self, e: OSError) -> None:
        file, self.file = self.file, None
        print(f"{self.path}: could not write ({e!r}): no more metrics lines are written; the run goes on",
              file=sys.stderr, flush=True)
        if file is not None:
            try:
                file.close()
            except OSError:
                pass

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self._failed(e)
            self.file = None
