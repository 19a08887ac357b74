"""Reads the history an offline wandb run wrote (RUN_DIR/wandb/offline-run-*/run-ID.wandb): wandb 0.31 reads
its transaction log in its Go core only, so the framing is read here (leveldb's log format, after wandb's
7-byte header) and each record parsed with wandb's own protobuf classes."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # b":W&B", a 2-byte magic, a version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes):
    assert data[:4] == b":W&B", data[:8]
    pos, parts = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record's header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        parts += data[pos:pos + length]
        pos += length
        if kind in (FULL, LAST):
            yield parts
            parts = b""


def _parsed(run_file, kind: str) -> list:
    """The run file's records of `kind` (a record_type: "history", "exit", ...), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    found = []
    for data in _records(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == kind:
            found.append(getattr(record, kind))
    return found


def history(run_file) -> list[dict]:
    """The run file's history rows, in order, as {key: value} (wandb's own _step, _runtime, ... included)."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
            for h in _parsed(run_file, "history")]


def exit_code(run_file) -> int | None:
    """The exit code the run was finished with (not 0: wandb marks it failed); None where it was not finished."""
    ends = _parsed(run_file, "exit")
    return ends[-1].exit_code if ends else None


def offline_runs(run_dir) -> list[Path]:
    """The offline runs' files under run_dir, oldest first (one per process that logged)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def finished_runs(run_dir, count: int, timeout: float = 60, running=None) -> list[Path]:
    """offline_runs(run_dir) once there are `count` of them and each holds its exit record: wandb's service
    writes a run's last records out as it closes the run, which it may still be doing once finish() has
    returned in the process that logged, or that process has ended (read at once under load, a run file held
    its header alone). After `timeout` s, or 10 s after `running()` turns false (the process that logs has
    ended: only its service's last writes are waited for), what there is (the caller's assertions then say
    what is missing)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        runs = offline_runs(run_dir)
        try:
            if len(runs) == count and all(exit_code(r) is not None for r in runs):
                return runs
        except Exception:  # noqa: BLE001 - a record still being written
            pass
        if running is not None and not running():
            running = None
            deadline = min(deadline, time.monotonic() + 10)
        if time.monotonic() >= deadline:
            return runs
        time.sleep(0.2)
