"""polar/score_output.py: what a rerun of `polar score` finds in a partial output, and how it is
written (the end-to-end resume is tests/engine/test_score_chunks.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from polar.score_output import ResumeError, RowWriter, check_settings, partial_paths, rows_written

SETTINGS = {"checkpoint": "/c/step_6", "max_length": 16384}


def _partial(tmp_path, text: str, settings=SETTINGS) -> str:
    out = str(tmp_path / "out.jsonl")
    partial, record = partial_paths(out)
    with open(partial, "w") as f:
        f.write(text)
    if settings is not None:
        with open(record, "w") as f:
            json.dump(settings, f)
    return out


def test_rows_are_counted_against_the_input_and_a_torn_row_is_cut(tmp_path, capsys):
    out = _partial(tmp_path, '{"line": 1, "rewards": [0.5]}\n{"line": 3, "error": "x"}\n{"line": 4, "rew')
    assert check_settings(out, SETTINGS)
    assert rows_written(out, [1, 3, 4, 5], cut_torn=False) == 2
    assert os.path.getsize(partial_paths(out)[0]) > 60  # a reading rank leaves the file alone
    assert rows_written(out, [1, 3, 4, 5], cut_torn=True) == 2
    assert "its last row (16 bytes at byte 56) is incomplete" in capsys.readouterr().err
    assert open(partial_paths(out)[0]).read().endswith('"error": "x"}\n')


@pytest.mark.parametrize("text,expected,message", [
    ('{"line": 2}\n', [1, 2], "the row of input line 2, where input line 1 comes next"),
    ('{"line": 1}\n{"line": 2}\n', [1], "more rows than the input has lines"),
    ('{"id": 1}\n', [1], "not a row of polar score"),
    ("not json\n", [1], "not a row of polar score"),
])
def test_a_partial_output_of_another_input_is_refused_by_row(tmp_path, text, expected, message):
    out = _partial(tmp_path, text)
    with pytest.raises(ResumeError, match=message) as e:
        rows_written(out, expected, cut_torn=True)
    assert f"{out}.partial:" in str(e.value) and f"delete {out}.partial and {out}.partial.json" in str(e.value)


def test_settings_decide_whether_a_partial_output_is_continued(tmp_path):
    out = str(tmp_path / "out.jsonl")
    assert not check_settings(out, SETTINGS)  # none there
    out = _partial(tmp_path, "", settings={"max_length": 1})
    assert not check_settings(out, SETTINGS)  # an empty one holds no reward to mix with
    out = _partial(tmp_path, '{"line": 1}\n', settings=dict(SETTINGS, max_length=8))
    with pytest.raises(ResumeError, match=r"other settings \(max_length: 8 -> 16384\)"):
        check_settings(out, SETTINGS)
    out = _partial(tmp_path, '{"line": 1}\n', settings=None)
    os.remove(partial_paths(out)[1])
    with pytest.raises(ResumeError, match="without its settings record"):
        check_settings(out, SETTINGS)


def test_the_writer_appends_whole_rows_and_renames_at_the_end(tmp_path):
    out = str(tmp_path / "out.jsonl")
    w = RowWriter(out, SETTINGS)
    assert json.load(open(partial_paths(out)[1])) == SETTINGS  # the record before any row
    w.write([{"line": 1, "rewards": [1.0]}, {"line": 2, "error": "bad"}])
    w.write([{"line": 4, "rewards": [2.0, 3.0]}])
    assert not os.path.exists(out)
    w.finish()
    assert [json.loads(x)["line"] for x in open(out)] == [1, 2, 4]
    assert not any(os.path.exists(p) for p in partial_paths(out))


def test_a_second_writer_on_one_output_is_refused(tmp_path):
    out = str(tmp_path / "out.jsonl")
    w = RowWriter(out, SETTINGS)
    # another process (flock locks are per open file; a second process is what a requeued job is)
    code = (f"from polar.score_output import RowWriter, ResumeError\ntry:\n    RowWriter({out!r}, {SETTINGS!r})\n"
            f"except ResumeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "another polar score is writing this output" in proc.stdout, proc.stdout + proc.stderr
    w.finish()


def test_a_writer_refused_leaves_the_record_of_the_one_writing(tmp_path):
    # a second run with other settings, refused for the lock, had written its settings over the
    # first run's record: the first run's rows then passed for the second run's on a rerun
    out = str(tmp_path / "out.jsonl")
    w = RowWriter(out, SETTINGS)
    with pytest.raises(ResumeError, match="another polar score is writing this output"):
        RowWriter(out, dict(SETTINGS, max_length=8))  # flock: a second open file conflicts in one process too
    assert json.load(open(partial_paths(out)[1])) == SETTINGS
    w.finish()


def test_a_partial_output_that_cannot_be_opened_is_named(tmp_path):
    """A directory where OUTPUT.partial goes (or no permission, a full disk) was a traceback."""
    out = str(tmp_path / "out.jsonl")
    os.mkdir(partial_paths(out)[0])
    with pytest.raises(ResumeError, match=r"out\.jsonl\.partial: cannot be opened to append the rows \(Is a "
                                          r"directory\); choose another --output"):
        RowWriter(out, SETTINGS)
    assert not os.path.exists(partial_paths(out)[1])


def test_a_writer_closed_keeps_its_rows_and_lets_go_of_the_lock(tmp_path):
    """A run that fails (a line too long, a checkpoint that does not load) closes its writer: the
    lock was held until the process ended, and a caller in that process (polar score at --nproc 1
    from Python) retrying found its own output "busy"."""
    out = str(tmp_path / "out.jsonl")
    w = RowWriter(out, SETTINGS)
    w.write([{"line": 1, "rewards": [1.0]}])
    w.close()
    w.close()  # twice, or after finish(): nothing more to let go
    assert check_settings(out, SETTINGS) and rows_written(out, [1, 2], cut_torn=True) == 1  # kept for a rerun
    with RowWriter(out, SETTINGS) as again:  # the same process: refused while the first held its lock
        again.write([{"line": 2, "rewards": [2.0]}])
        again.finish()
    assert [json.loads(x)["line"] for x in open(out)] == [1, 2]


def test_a_writer_closed_before_its_first_row_leaves_no_partial_output(tmp_path):
    out = str(tmp_path / "out.jsonl")
    with RowWriter(out, SETTINGS):
        assert all(os.path.exists(p) for p in partial_paths(out))
    assert not any(os.path.exists(p) for p in partial_paths(out))  # left behind, a record of a run that wrote none


def test_a_record_that_cannot_be_written_is_named_and_lets_go_of_the_lock(tmp_path):
    """A directory where the settings record goes (a full disk, no permission): a traceback, and the
    partial output's lock held on until the process ended."""
    out = str(tmp_path / "out.jsonl")
    os.mkdir(partial_paths(out)[1])
    with pytest.raises(ResumeError, match=r"out\.jsonl\.partial\.json: cannot be written \(Is a directory\)"):
        RowWriter(out, SETTINGS)
    os.rmdir(partial_paths(out)[1])
    RowWriter(out, SETTINGS).close()  # not "another polar score is writing this output"


def test_a_run_waiting_on_the_lock_of_one_that_finishes_does_not_append_to_its_output(tmp_path):
    """A second run (a requeued job) that opened OUTPUT.partial just before the first finished, and
    took its lock as the first let go: it appended its rows to the file the first had renamed to
    OUTPUT, and then failed to rename a partial output no longer there. It now starts a partial
    output of its own."""
    out = str(tmp_path / "out.jsonl")
    partial = os.path.realpath(partial_paths(out)[0])
    first = RowWriter(out, SETTINGS)
    first.write([{"line": 1, "rewards": [1.0]}])
    # the second run waits on the lock for as long as it takes here (engine.file_lock.TRIES)
    code = ("import engine.file_lock\nengine.file_lock.TRIES = 10 ** 9\nfrom polar.score_output import RowWriter\n"
            f"w = RowWriter({out!r}, {SETTINGS!r})\nw.write([{{'line': 7, 'rewards': [7.0]}}])\nw.finish()\n")
    second = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not _has_open(second.pid, partial):
            assert second.poll() is None, second.communicate()[0]
            time.sleep(0.01)
        first.finish()
        log = second.communicate(timeout=60)[0]
    finally:
        second.kill()
        second.wait()
    assert second.returncode == 0, log
    assert [json.loads(x)["line"] for x in open(out)] == [7]
    assert not any(os.path.exists(p) for p in partial_paths(out))


def _has_open(pid: int, path: str) -> bool:
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(os.path.join(fds, name)) == path:
                return True
        except OSError:  # closed meanwhile
            pass
    return False
