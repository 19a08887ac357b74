"""The repository stands alone: no tracked file cites notes that live outside it.

Comments and docs cite the paper (section, equation) or state the fact itself. The names are matched
as regular expressions so that this file does not match itself. .ci/ is left out: it is the harness
that runs the tests, not part of the project a user reads.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_NOTES = re.compile(r"\bPOLAR\.md\b|\bPLATFORM\.md\b|\bSTYLE\.md\b|\.\./shared\b")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout")
    return [p for p in proc.stdout.decode().split("\0") if p and not p.startswith(".ci/")]


def test_no_file_cites_notes_outside_the_repository():
    files = _tracked_files()
    assert "README.md" in files and "polar/cli.py" in files  # the listing is the repository's
    hits = []
    for rel in files:
        path = ROOT / rel
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        hits += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE_NOTES.search(line)]
    assert not hits, "cite the paper or state the fact instead:\n" + "\n".join(hits)


# written in pieces, or this file would cite them itself
@pytest.mark.parametrize("line", ["see POLAR" + ".md section 4", "(PLATFORM" + ".md)", "STYLE" + ".md",
                                  ".." + "/shared/x"])
def test_the_pattern_catches_each_name(line):
    assert OUTSIDE_NOTES.search(line)
