"""Every `python benchmarks/X.py ...` command quoted in benchmarks/RESULTS.md and README.md names a
script that exists, and every `--flag` quoted with it is one the script still takes (it appears in
the script's --help), so no figure or instruction points at a script or option the repository does
not have. Each script's --help runs once, all in one process that imports torch once (it took ~17 s of
CPU as 27 processes, most of it the nine whose --help imports torch)."""
import re
import tempfile
from pathlib import Path

from tests.benchmarks.script_runs import run_scripts

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("benchmarks/RESULTS.md", "README.md")
COMMAND = re.compile(r"python3?\s+(benchmarks/[\w./-]+\.py)((?:[ \t]+[^\s;|&>`]+)*)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def quoted_commands(text: str) -> list[tuple[str, list[str], str]]:
    """(script, its quoted --flags, the command as quoted) for each benchmark command in a markdown
    text: in fenced blocks a line (with its backslash continuations), in inline code the whole span
    (it may wrap across lines), elsewhere the rest of the line. Flags after a bare `--` are the
    scripts' pass-through settings, not their options."""
    pieces = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    pieces += [span.replace("\n", " ") for span in SPAN.findall(prose)]
    pieces += SPAN.sub("\n", prose).splitlines()
    found = []
    for piece in pieces:
        for line in piece.splitlines():
            for m in COMMAND.finditer(line):
                args = m.group(2).split(" -- ")[0]
                found.append((m.group(1), FLAG.findall(args), m.group(0).strip()))
    return found


HELPS: dict = {}  # script -> its --help text, run once a session


def help_texts(scripts: list[str]) -> dict:
    """Each script's --help, those not yet known run in one process (tests/benchmarks/script_runs.py)."""
    todo = [s for s in scripts if s not in HELPS]
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            runs = run_scripts([(ROOT / s, ["--help"], ROOT) for s in todo], Path(tmp))
        for script, run in zip(todo, runs):
            assert run["code"] == 0, f"{script} --help exited {run['code']}: {run['stderr'][-2000:]}"
            HELPS[script] = run["stdout"]
    return {s: HELPS[s] for s in scripts}


def unknown_flags(commands: list[tuple[str, list[str], str]]) -> list[str]:
    """'script: --flag (in: command)' for each quoted flag its script's --help does not list."""
    helps = help_texts(sorted({script for script, _, _ in commands if (ROOT / script).is_file()}))
    return [f"{script}: {flag} (in: {command})" for script, flags, command in commands if script in helps
            for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[script])]


def documents_commands() -> dict:
    return {doc: quoted_commands((ROOT / doc).read_text()) for doc in DOCUMENTS}


def test_quoted_benchmark_commands_name_existing_scripts():
    for doc, commands in documents_commands().items():
        assert commands, f"{doc} quotes no benchmark command"
        missing = sorted({s for s, _, _ in commands if not (ROOT / s).is_file()})
        assert missing == [], f"{doc} quotes commands for scripts that do not exist: {missing}"


def test_quoted_flags_are_options_the_scripts_take():
    commands = [c for cs in documents_commands().values() for c in cs]
    assert any(flags for _, flags, _ in commands), "no quoted command has a flag: the pattern lost them"
    assert unknown_flags(commands) == []


def test_a_flag_the_script_does_not_take_is_caught():
    commands = quoted_commands("run `python benchmarks/packer.py --groups 10 --python-groups 5 --no-such-flag`")
    assert unknown_flags(commands) == ["benchmarks/packer.py: --no-such-flag (in: python benchmarks/packer.py "
                                       "--groups 10 --python-groups 5 --no-such-flag)"]
    # a prefix of a real option is not that option: quoted commands give the names in full
    assert unknown_flags(quoted_commands("`python benchmarks/packer.py --python`")) != []


def test_the_pattern_finds_commands_in_their_usual_forms():
    text = ("`python benchmarks/a.py --x 1` and `OMP_NUM_THREADS=1 python benchmarks/b_c.py`, "
            "`.venv/bin/python benchmarks/d.py`; not benchmarks/e.py alone. A span that wraps: "
            "`python benchmarks/f.py --shards 8\n100 --repeats 3` and `python benchmarks/g.py [--k 2 8]` "
            "(`--no-time` is prose)\n```bash\npython benchmarks/h.py --a 1 \\\n  --b 2\npython benchmarks/i.py\n"
            "```\n`python benchmarks/j.py --steps 3 -- train.x=1 --not-a-flag` then python3 benchmarks/k.py --y")
    assert {(s, tuple(f)) for s, f, _ in quoted_commands(text)} == {
        ("benchmarks/a.py", ("--x",)), ("benchmarks/b_c.py", ()), ("benchmarks/d.py", ()),
        ("benchmarks/f.py", ("--shards", "--repeats")), ("benchmarks/g.py", ("--k",)),
        ("benchmarks/h.py", ("--a", "--b")), ("benchmarks/i.py", ()), ("benchmarks/j.py", ("--steps",)),
        ("benchmarks/k.py", ("--y",))}
