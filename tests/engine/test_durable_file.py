import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import durable_file
from tests.engine.durable_record import published_durably, record


def test_a_file_is_fsynced_before_the_rename_publishes_it_and_the_directory_after(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")
    calls = record(monkeypatch.setattr)
    durable_file.write_file(target, '{"step": 3}')
    published_durably(calls, target)
    assert target.read_text() == '{"step": 3}'
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left


def test_bytes_are_written_as_bytes(tmp_path):
    durable_file.write_file(tmp_path / "x.idx", b"\0\1\2")
    assert (tmp_path / "x.idx").read_bytes() == b"\0\1\2"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_the_file_gets_the_mode_any_new_file_gets_not_a_temporary_files(tmp_path, umask):
    """os.replace keeps the temporary file's mode: mkstemp's 0600 made a file others read unreadable."""
    old = os.umask(umask)
    try:
        durable_file.write_file(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with durable_file.Replacement(target) as r:
            r.file.write("half")
            1 / 0
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["record.json"]


def test_a_write_the_file_system_refuses_leaves_the_old_file_and_no_temporary_file(tmp_path):
    """A full disk fails the write, and again the close that flushes the rest: the temporary file was
    left beside the target. The kernel's file size limit refuses writes as a full disk does (EFBIG for
    ENOSPC), in a process of its own."""
    target = tmp_path / "record.json"
    target.write_text("old")
    script = (f"import resource, signal\n"
              f"from engine import durable_file\n"
              f"signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))\n"
              f"try:\n"
              f"    durable_file.write_file({str(target)!r}, 'x' * 5000)\n"  # buffered until the commit's flush
              f"except OSError as e:\n"
              f"    print(e.errno, e.__context__ is None)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2])
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["record.json"], proc.stdout + proc.stderr
    assert proc.stdout.split() == [str(errno.EFBIG), "True"], proc.stdout + proc.stderr  # the write's own error


def test_a_replacement_not_committed_is_removed(tmp_path):
    def write_then_give_up():
        with durable_file.Replacement(tmp_path / "out.jsonl") as r:
            r.file.write("line\n")
            return "nothing written"

    assert write_then_give_up() == "nothing written"
    assert os.listdir(tmp_path) == []


def test_a_rename_that_fails_removes_the_temporary_file(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "in_the_way").write_text("")
    with pytest.raises(OSError):
        durable_file.write_file(tmp_path / "latest", "step_00000003")
    assert sorted(os.listdir(tmp_path)) == ["latest"]


def test_an_fsync_that_fails_is_raised_and_nothing_is_published(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        durable_file.write_file(tmp_path / "latest", "step_00000003")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["a" * 255, "é" * 127 + "a"])  # 255 bytes: the longest name ext4 takes
def test_a_name_the_file_system_takes_is_written_though_its_temporary_name_is_longer(tmp_path, name):
    durable_file.write_file(tmp_path / name, "x")
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_text() == "x"


def test_two_writers_of_one_file_each_write_their_own_temporary_file(tmp_path):
    with durable_file.Replacement(tmp_path / "tokenizer.json") as a, \
            durable_file.Replacement(tmp_path / "tokenizer.json") as b:
        assert a.tmp != b.tmp
        a.file.write("a")
        b.file.write("b")
        a.commit()
        b.commit()
    assert os.listdir(tmp_path) == ["tokenizer.json"] and (tmp_path / "tokenizer.json").read_text() == "b"


def test_a_tree_is_synced_file_by_file_each_directory_after_what_it_holds(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    for f in ("a.distcp", "metadata.json", "sub/common.pt"):
        (tmp_path / f).write_text("x")
    calls = record(monkeypatch.setattr)
    durable_file.sync_tree(tmp_path)
    synced = [c[1] for c in calls]
    root = os.path.realpath(tmp_path)
    assert synced.index(f"{root}/sub/common.pt") < synced.index(f"{root}/sub") < synced.index(root)
    assert synced.index(f"{root}/a.distcp") < synced.index(root) and synced[-1] == root
    assert sorted(synced) == sorted([root, f"{root}/sub", f"{root}/sub/common.pt", f"{root}/a.distcp",
                                     f"{root}/metadata.json"])


def test_files_their_writer_synced_are_left_but_their_directory_is_synced(tmp_path, monkeypatch):
    for f in ("a.distcp", "metadata.json"):
        (tmp_path / f).write_text("x")
    calls = record(monkeypatch.setattr)
    durable_file.sync_tree(tmp_path, synced=lambda name: name.endswith(".distcp"))
    root = os.path.realpath(tmp_path)
    assert [c[1] for c in calls] == [f"{root}/metadata.json", root]


@pytest.mark.parametrize("code, raised", [(errno.EINVAL, False), (errno.EIO, True)])
def test_a_directory_the_file_system_cannot_sync_is_left_but_an_io_error_is_raised(tmp_path, monkeypatch,
                                                                                 code, raised):
    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    if raised:
        with pytest.raises(OSError):
            durable_file.sync_dir(tmp_path)
    else:
        durable_file.sync_dir(tmp_path)
