"""Which files `polar data build` reads: the inputs as given, directories as their JSONL files.

Nothing is skipped without a word: a directory's other files are named on stderr, a compressed
file is refused with the command that decompresses it, and a file given twice is refused (its
records would be trained twice as often as the others'). A dataset directory among the inputs
(a rerun into its own input directory, say) is never read back as records.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from polar.records import NOT_REGULAR, compressed_format, compressed_problem

# Compressed JSONL a directory may hold: `gunzip -k` and `zstd -d` keep it beside the text they write.
_PACKED = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_SHARD_SUFFIXES = (".rejects.jsonl", ".bin", ".idx", ".json")


def names(items: list[str], first: int = 5) -> str:
    """The first `first` of `items`, comma-separated, and how many more."""
    more = f" and {len(items) - first} more" if len(items) > first else ""
    return ", ".join(items[:first]) + more


def _shard_file(entry: Path) -> bool:
    """A file of a shard (or of one being written) in a dataset directory: a rerun, or another
    shard's build, into a directory that is also an input finds them there."""
    name = entry.name[:-len(".tmp")] if entry.name.endswith(".tmp") else entry.name
    suffix = next((x for x in _SHARD_SUFFIXES if name.endswith(x)), None)
    if suffix is None:
        return False
    stem = name[:-len(suffix)]
    return bool(re.fullmatch(r"part-\d{5}-of-\d{5}", stem)) or (entry.parent / f"{stem}.idx").exists()


def directory_files(directory: str, output: str, rejects: str) -> list[str]:
    """The files read from an input directory: names ending in .jsonl, in any case (a .JSONL file is
    meant as data too), sorted. Its other entries are named on stderr: data skipped without a word is
    data lost. A compressed JSONL file (r.jsonl.gz) is taken, to be refused with the command that
    decompresses it, unless its decompressed copy lies beside it. Shard files (a rejects list too) are
    not read. Hidden files and the build's own outputs (an output directory inside this one, its
    shards if it is this one, the rejects list) are not data, and not named."""
    ours = {os.path.realpath(p) for p in (output, rejects, rejects + ".tmp" if rejects else "") if p}
    out_here = bool(output) and os.path.realpath(output) == os.path.realpath(directory)
    read, other = [], []
    for entry in sorted(Path(directory).iterdir(), key=str):
        name, low = entry.name, entry.name.lower()
        if os.path.realpath(entry) in ours:
            continue
        if _shard_file(entry):  # a rejects list holds no record; another dataset's shards are named
            if not out_here:
                other.append(name)
        elif low.endswith(".jsonl") and not entry.is_dir():  # a hidden one too, as the *.jsonl glob read it
            read.append(str(entry))
        elif name.startswith("."):
            continue
        elif entry.is_dir():
            other.append(name + "/")
        elif (low.endswith(_PACKED) and low.rsplit(".", 1)[0].endswith(".jsonl")
              and not (entry.parent / name.rsplit(".", 1)[0]).exists() and compressed_format(str(entry))):
            read.append(str(entry))
        else:
            other.append(name)
    if not read:
        holds = f" (it holds {names(other)})" if other else ""
        raise FileNotFoundError(f"{directory}: no *.jsonl file in this directory{holds}")
    if other:
        print(f"note: {directory}: {len(other)} entr{'y' if len(other) == 1 else 'ies'} not read (a directory is "
              f"read as its *.jsonl files, in any case): {names(other)}", file=sys.stderr, flush=True)
    return read


def input_files(paths: list[str], output: str = "", rejects: str = "") -> list[str]:
    """The JSONL files a build reads, in order: each file as given, each directory as its files
    (directory_files); the build's own outputs (its rejects list, shard files in the output directory)
    are left out, with a note. Refused by name: a path that does not exist, one that is no regular file (a
    pipe: each input is read twice), a compressed file, and a file given twice (directly, through a
    directory, or as a symbolic or hard link to it)."""
    files, own = [], []
    ours = {os.path.realpath(p) for p in (rejects, rejects + ".tmp" if rejects else "") if p}
    for p in paths:
        if os.path.isdir(p):
            files.extend(directory_files(p, output, rejects))
        elif os.path.isfile(p):
            # `data/*.jsonl -o data`: the glob of a rebuild names the shard's rejects list, which was read
            # as records, its rows rejected into the list that replaced it (2, 4, 6 ... rejects a rebuild)
            if os.path.realpath(p) in ours or (bool(output) and _shard_file(Path(p)) and
                                               os.path.realpath(os.path.dirname(p) or ".") == os.path.realpath(output)):
                own.append(p)
            else:
                files.append(p)
        elif os.path.exists(p):
            # a pipe (`<(zcat r.jsonl.gz)`) was "no such file or directory", which sent its user looking for a typo
            raise ValueError(f"{p}: {NOT_REGULAR}: every input is read more than once "
                             "(its lines counted, then its chunks read), so write it to a file first")
        else:
            # a shell passes a pattern that matches nothing on as it is
            glob = " (a pattern that matched no file?)" if any(c in p for c in "*?[") else ""
            raise FileNotFoundError(f"{p}: no such file or directory{glob}")
    if own:
        print(f"note: not read: {names(own)}, the output's own shard files or rejects list, not records",
              file=sys.stderr, flush=True)
    for f in files:
        packed = compressed_problem(f)
        if packed:
            raise ValueError(f"{f}: {packed}")
    twice = given_twice(files)
    if twice:
        # its records would be built twice, and trained twice as often as the others
        raise ValueError(f"{twice}, directly, through a directory or as a link to the same file: list each input once")
    return files


def given_twice(files: list[str]) -> str:
    """"B is given twice (also as A)" for the first file that names one given before it, "" for none.
    The file, not its path: a hard link (a `cp -al` snapshot) or a bind mount of it names it again."""
    seen: dict = {}
    for f in files:
        st = os.stat(f)
        if (st.st_dev, st.st_ino) in seen:
            return f"{f} is given twice (also as {seen[st.st_dev, st.st_ino]})"
        seen[st.st_dev, st.st_ino] = f
    return ""


def missing_dirs(path: Path, flag: str) -> list[Path]:
    """The directories of `path` that do not exist yet, deepest first; NotADirectoryError naming the
    option `flag` that gives them when a file stands where one of them would be (found before the
    inputs are read, where making them after was "[Errno 17] File exists")."""
    missing = []
    path = path.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    if not path.is_dir():
        raise NotADirectoryError(f"{flag}: {path} is a file, where a directory is needed")
    return missing
