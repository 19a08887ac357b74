"""`polar score`'s output on disk while it runs.

Rows go to OUTPUT.partial chunk by chunk, flushed and synced, so a stopped run (a kill, a lost node,
a job's time limit) loses at most the chunk in flight; OUTPUT itself appears only when every line
is written (a renamed whole file: a reader never takes a half-written OUTPUT for a finished one).
Beside the partial file a settings record (OUTPUT.partial.json) says what wrote it; a rerun of the
same command on the same input continues after the rows already there, and a rerun with settings
that would give other rewards is refused rather than mixed into them. A run that fails or is
stopped before its first row leaves neither file (the empty ones a SIGKILL leaves count as none).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from engine.durable_file import sync_dir, write_file
from polar.records import AppendedLines, OutputBusy, append_locked


class ResumeError(Exception):
    """The partial output cannot be continued (or written) as it is; the message says why and what to do."""


def partial_paths(output: str) -> tuple[str, str]:
    """(the rows written so far, the settings record beside them)."""
    return output + ".partial", output + ".partial.json"


def _fresh_start(partial: str) -> str:
    return f"delete {partial} and {partial}.json to score from the first line"


def check_settings(output: str, settings: dict) -> bool:
    """True when a partial output of this run's settings is there to continue; False when there is
    none. A partial output written with other settings, or without its record, is refused."""
    partial, record = partial_paths(output)
    if not os.path.exists(partial) or os.path.getsize(partial) == 0:  # nothing written: nothing to mix
        return False
    if not os.path.exists(record):
        raise ResumeError(f"{partial} is there without its settings record {record}, so whether its rewards "
                          f"match this run's cannot be checked; {_fresh_start(partial)}")
    try:
        with open(record, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ResumeError(f"{record}: cannot be read ({e}); {_fresh_start(partial)}") from None
    if not isinstance(old, dict):
        raise ResumeError(f"{record}: not a settings record (a JSON object); {_fresh_start(partial)}")
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ResumeError(f"{partial} was written by a run with other settings ({details}): its rewards and this "
                          f"run's would be mixed in one output; rerun with the earlier settings, or "
                          f"{_fresh_start(partial)}")
    return True


def rows_written(output: str, expected_lines: Sequence[int], cut_torn: bool) -> int:
    """How many rows the partial output holds, checked against the input: row k must be the output
    of input line expected_lines[k]. A torn last row (a stop mid-write) does not count; with
    `cut_torn` (the writing rank) it is cut from the file, with a message."""
    partial, _ = partial_paths(output)
    if not os.path.exists(partial):
        return 0
    k = 0
    lines = AppendedLines(partial)
    for k, raw in lines:
        where = f"{partial}:{k}"
        try:
            row = json.loads(raw)
            line = row["line"]
        except (ValueError, KeyError, TypeError):
            raise ResumeError(f"{where}: not a row of polar score (a JSON object with its input 'line'); "
                              f"{_fresh_start(partial)}") from None
        if k > len(expected_lines):
            raise ResumeError(f"{where}: the partial output has more rows than the input has lines; is this "
                              f"the right --input? {_fresh_start(partial)}")
        if line != expected_lines[k - 1]:
            raise ResumeError(f"{where}: the row of input line {line!r}, where input line {expected_lines[k - 1]} "
                              f"comes next; the input is not the one the partial output was written for. "
                              f"{_fresh_start(partial)}")
    if cut_torn:
        lines.cut_torn("polar score", "its last row", "its line is scored again")
    return k


class RowWriter:
    """The partial output, locked and open for appending, on the rank that writes it. The lock lasts
    until finish() or close(): a run that fails in a process that goes on (polar score at --nproc 1
    called from Python, a caller retrying) lets go of it, or a second run in that process found its
    own output "busy" (flock locks belong to the open file, not the process)."""

    def __init__(self, output: str, settings: dict):
        self.output = output
        self.partial, self.record = partial_paths(output)
        self.fd = None
        # the lock before the record: a second run refused here had replaced the record of the run
        # writing, whose rows a later rerun of the second run's settings would then have continued
        try:  # two runs of one command (a requeued job whose first copy still runs) would both append
            self.fd = append_locked(self.partial, "polar score")
        except OutputBusy as e:
            raise ResumeError(str(e)) from None
        except OSError as e:  # a directory of that name, no permission, a full disk: a message, not a traceback
            raise ResumeError(f"{self.partial}: cannot be opened to append the rows ({e.strerror or e}); "
                              "choose another --output or remove what is there") from None
        # the record before any row: a partial file with rows is never there without one
        # (check_settings refuses that)
        if os.fstat(self.fd).st_size == 0:
            try:
                write_file(self.record, json.dumps(settings, indent=1, sort_keys=True))
            except OSError as e:
                self.close()
                raise ResumeError(f"{self.record}: cannot be written ({e.strerror or e}); choose another --output "
                                  "or remove what is there") from None

    def write(self, rows: list) -> None:
        """Rows appended whole and synced: what a stop leaves is at most one torn row at the end."""
        data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def finish(self) -> None:
        """Every row is written: the partial output becomes OUTPUT, its record goes, and then the lock:
        a second run waiting on it finds no partial output to append to (append_locked checks the file
        it locked is still the one under that name)."""
        os.replace(self.partial, self.output)
        # the rename on the disk before the record goes: after a crash of the machine the disk held
        # the partial output without its record, which a rerun refuses
        sync_dir(os.path.dirname(os.path.abspath(self.output)))
        os.remove(self.record)
        self._let_go()

    def close(self) -> None:
        """The run ends without finish() (an error, a stop): its rows stay for a rerun to continue and
        the lock is let go. A partial output this run left empty goes, with its record: a run stopped
        before its first row (a line too long, a checkpoint that does not load) left both behind."""
        if self.fd is None:
            return
        if os.fstat(self.fd).st_size == 0:
            for path in (self.partial, self.record):
                try:
                    os.remove(path)
                except OSError:  # gone already, or not a file (a record that could not be written): left as it is
                    pass
        self._let_go()

    def _let_go(self) -> None:
        fd, self.fd = self.fd, None
        os.close(fd)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
