"""The rejects list of a shard `polar data build` (polar/data_build.py) writes, and the one a rebuild
(--force) replaces: which file is whose, which the build may replace or remove, and what it says of
one it keeps. A shard's metadata names its list (rejects_file) with a digest of it (rejects_sha256);
the list is written under a temporary name and put in place with the shard (engine/shard_writer.py
ShardWriter.close), so a failed rebuild leaves the old shard with its own rejects."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


# What replaced_rejects says of the list a shard names: the file there is the one its build wrote
# (the digest in its metadata matches), a shard built before digests were recorded names it, or the
# file has changed since (another build's list now, written once the shard's was gone)
OWN_LIST, NAMED_LIST, CHANGED_LIST = "own", "named", "changed"


def replaced_rejects(name: Path) -> tuple[Path | None, str]:
    """The rejects file named by the metadata of the shard at `name` (None: no shard, or no rejects),
    and OWN_LIST, NAMED_LIST or CHANGED_LIST ("" for a file not there)."""
    try:
        meta = json.loads(name.with_suffix(".json").read_text())
        old, digest = meta.get("rejects_file"), meta.get("rejects_sha256")
    except (OSError, ValueError, AttributeError):
        return None, ""
    if not isinstance(old, str):
        return None, ""
    try:
        with open(old, "rb") as f:
            held = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:  # gone (removed by hand), or unreadable: nothing this build would remove
        return Path(old), ""
    if not isinstance(digest, str):
        return Path(old), NAMED_LIST
    return Path(old), OWN_LIST if held == digest else CHANGED_LIST


def check_rejects_path(rejects_file: Path, rejects_path: str, replaced: Path | None, own: str) -> None:
    """FileExistsError unless a --rejects path (`rejects_path`, "" for the default name) is free or
    holds the list of the shard this build replaces (`replaced`, `own`: replaced_rejects'). Another
    file there is another shard's or build's list (shards given one --rejects path): replacing or
    deleting it would lose those records' reasons."""
    if rejects_path and rejects_file.exists() and not (same_file(rejects_file, replaced) and own != CHANGED_LIST):
        raise FileExistsError(f"--rejects {rejects_file} exists and is not the rejects list of the shard this build "
                              f"replaces (another shard's or build's?): give each shard its own --rejects path, or "
                              "remove the file")


def rejects_in_place(rejects_file: Path, rejects_tmp: Path, rejected: int, rejects_path: str,
                     replaced: Path | None, own: str) -> tuple[list, str]:
    """The files ShardWriter.close puts in place with the shard (its rejects list, and the removal of
    the list the shard it replaces named, a list of records the new shard does not hold), and a note
    on that old list for the user ("" for none)."""
    with_files = [(rejects_tmp, rejects_file)] if rejected else []
    if not rejected and (not rejects_path or (same_file(rejects_file, replaced) and own != CHANGED_LIST)):
        with_files.append((None, rejects_file))  # the replaced shard's, or a leftover of this shard's name
    if replaced is None or not own or same_file(rejects_file, replaced):
        return with_files, ""
    if own == OWN_LIST:
        with_files.append((None, replaced))
        return with_files, f"{replaced}, the rejects list of the shard replaced, was removed with it"
    why = ("has changed since its build wrote it (another build's list now?)" if own == CHANGED_LIST else
           "was written by a build that recorded no digest of it to tell it from another's")
    return with_files, (f"{replaced}, named as the rejects list of the shard replaced, is kept: it {why}; it "
                        "describes no shard of this directory now")


def same_file(a: Path, b: Path | None) -> bool:
    return b is not None and os.path.abspath(a) == os.path.abspath(b)
