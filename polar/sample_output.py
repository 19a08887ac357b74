"""polar sample's output on disk: what a restart finds already written (a torn last line cut off),
the lock that keeps a second run off it, and the settings record a restart is checked against."""
from __future__ import annotations

import json
import os

from engine.durable_file import write_file
from polar.prompt_sources import PROGRESS_LINES, SampleError, byte_progress
from polar.records import AppendedLines, OutputBusy, append_locked


def read_done_ids(path: str, log=None, interval: float = 10.0) -> set[int]:
    """Ids already in the output; a torn last line (a kill mid-write) is cut off with a message.
    `log`: where a progress line goes every `interval` seconds (none without)."""
    done: dict[int, int] = {}
    if not os.path.exists(path):
        return set()
    # A long run's output holds ~10 KB a record and is read back at ~150 MB/s: a restart of one of
    # 100 GB sat silent for minutes before its first line
    progress = byte_progress(f"reading {path}", os.path.getsize(path), log, interval) if log else None
    lines, read = AppendedLines(path), 0
    for line_no, raw in lines:
        read += len(raw)
        if raw.strip():
            _add_done(done, raw, path, line_no)
        if progress is not None and not line_no % PROGRESS_LINES:
            progress.update(read >> 20)
    lines.cut_torn("polar sample", "the last line", "its prompt is sampled again")
    return set(done)


def _add_done(done: dict[int, int], raw: bytes, path: str, line_no: int) -> None:
    try:
        rec = json.loads(raw)
        i = rec["id"]
    except (ValueError, KeyError, TypeError):
        raise SampleError(f"{path}:{line_no}: not a record of polar sample (a JSON object with an "
                          f"integer 'id'); is this the right --output?") from None
    if not isinstance(i, int) or isinstance(i, bool):
        raise SampleError(f"{path}:{line_no}: field 'id' must be an integer, got {i!r}")
    if i in done:
        raise SampleError(f"{path}:{line_no}: id {i} repeats line {done[i]}; the file was written by "
                          f"something else or edited")
    done[i] = line_no


def lock_output(path: str) -> int:
    """The output, open for appending and locked (records.append_locked): two runs of one command
    both appended every prompt, and each later run stopped at the first repeated id."""
    try:
        return append_locked(path, "polar sample")
    except OutputBusy as e:
        raise SampleError(f"{e} (two runs would sample every prompt twice)") from None
    except OSError as e:  # a read-only mount, a directory without write permission: it was a traceback
        raise SampleError(f"{path}: cannot write the output: {e.strerror or e}") from None


# Settings that are lists of input files, with the settings of their sizes and of their content fingerprints
# (polar.input_fingerprint: sampled blocks, ~1 MiB read per file). Files are compared by name, as `polar data
# build` knows its inputs, since the same corpus is mounted at other paths on other machines (a restart on
# another node of the cluster was refused as "other settings"); a name and size alone took another corpus of
# the same file names and sizes (prompts.jsonl regenerated to the same byte count) for the same one, and a
# restart appended records of other prompts under the ids left: the fingerprints tell them apart.
INPUTS = {"corpus": ("corpus_bytes", "corpus_sample_sha256"),
          "instruction_prompts": ("instruction_bytes", "instruction_sample_sha256")}
PATH_SETTINGS = tuple(INPUTS)
FINGERPRINTS = {fp: (key, size) for key, (size, fp) in INPUTS.items()}


def _names(paths) -> list:
    return [os.path.basename(p) for p in paths] if isinstance(paths, list) else paths


def _same(key: str, old, new) -> bool:
    return _names(old) == _names(new) if key in PATH_SETTINGS else old == new


def _change(key: str, old: dict, new: dict, changed: list[str]) -> str | None:
    """How setting `key` changed, for the refusal; None for a fingerprint whose files' names or sizes
    changed too (said by those)."""
    if key in FINGERPRINTS:
        files, size = FINGERPRINTS[key]
        if files in changed or size in changed:
            return None
        before, now = old[key], new.get(key)
        if isinstance(before, list) and isinstance(now, list) and len(before) == len(now) == len(new[files]):
            other = [name for name, b, n in zip(_names(new[files]), before, now) if b != n]
            return (f"{files}: {', '.join(other)}: the same name{' and size' * (size in old)} as the file the "
                    f"output was written from, but its content differs (another sampled fingerprint: regenerated, "
                    f"or another dataset's file)")
    return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"


def check_settings(path: str, settings: dict, allow_changed: bool, log=None) -> None:
    """Stop a restart whose settings would give different records than the ones already written.
    Input files found at other paths under the same names, sizes and content (the fingerprints, where
    the record holds them) are the same inputs (`log` says so)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                old = json.load(f)
            except ValueError:  # not JSON, or not UTF-8 (a UnicodeDecodeError was a traceback)
                old = None
            if not isinstance(old, dict):
                raise SampleError(f"{path}: not a settings record (a JSON object); delete it to start the settings "
                                  "record afresh")
        # a setting the old record lacks was not recorded by the polar that wrote it: no change to report
        changed = sorted(k for k in old if not _same(k, old[k], settings.get(k)))
        moved = [k for k, related in INPUTS.items() if old.get(k, settings.get(k)) != settings.get(k)
                 and not set(changed) & {k, *related}]
        if moved and log is not None:
            log("; ".join(f"--{k.replace('_', '-')} read from {', '.join(settings[k])} (the output was written "
                          f"from {', '.join(old[k])}): the same file names"
                          f"{', sizes and content' if INPUTS[k][1] in old else ''}, taken as the same files"
                          for k in moved))
        if changed and not allow_changed:
            details = "; ".join(filter(None, (_change(k, old, settings, changed) for k in changed)))
            raise SampleError(f"{path}: the output was written with other settings ({details}); use another "
                              f"--output, or --allow-changed-settings to mix them")
    write_file(path, json.dumps(settings, indent=1, sort_keys=True))
