"""Every `python benchmarks/X.py` command quoted in benchmarks/RESULTS.md names a script that exists,
so no figure there points at a script the repository does not have."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMAND = re.compile(r"python3?\s+(benchmarks/[\w./-]+\.py)")


def quoted_scripts(text: str) -> set:
    return set(COMMAND.findall(text))


def test_quoted_benchmark_commands_name_existing_scripts():
    scripts = quoted_scripts((ROOT / "benchmarks" / "RESULTS.md").read_text())
    assert scripts, "RESULTS.md quotes no benchmark command"
    missing = sorted(s for s in scripts if not (ROOT / s).is_file())
    assert missing == [], f"RESULTS.md quotes commands for scripts that do not exist: {missing}"


def test_the_pattern_finds_commands_in_their_usual_forms():
    text = ("`python benchmarks/a.py --x 1` and `OMP_NUM_THREADS=1 python benchmarks/b_c.py`, "
            "`.venv/bin/python benchmarks/d.py`; not benchmarks/e.py alone")
    assert quoted_scripts(text) == {"benchmarks/a.py", "benchmarks/b_c.py", "benchmarks/d.py"}
