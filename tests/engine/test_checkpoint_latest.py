"""Which step latest() names after a save killed between its rename and `latest`, and after a run
that went back to an older step: the saves' last step (engine.checkpoint._finish_save, rank 0's
part of every save, synchronous or in the background) runs in a forked process that is SIGKILLed,
as a lost node would be, where it is about to rename something into a given name."""
from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path

import pytest

from engine import checkpoint


def _save(root: Path, step: int, die_at: str = "", **state) -> None:
    """Rank 0's last step of a save of `step` (metadata.json standing in for its shards), killed as it
    is about to rename something to `die_at` (a name in `root`; "": not killed)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            real = os.replace

            def replace(src, dst, *args, **kwargs):
                if Path(dst).name == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst, *args, **kwargs)

            os.replace = replace
            partial = root / f"step_{step:08d}.partial"
            checkpoint._start_save(root, partial)  # a save killed before left it: started again
            (partial / "metadata.json").write_text("{}")
            checkpoint._finish_save(root, partial, root / f"step_{step:08d}", {"step": step, **state}, None, 0)
            code = 0
        except BaseException:  # noqa: BLE001 - told to the test through the exit status
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    want = -signal.SIGKILL if die_at else 0
    assert os.waitstatus_to_exitcode(status) == want, f"save of step {step}: exit status {status}"


def _named(root: Path) -> str:
    return (root / checkpoint.LATEST).read_text()


def test_a_step_renamed_before_a_kill_kept_it_from_latest_is_the_newest(tmp_path):
    """Killed after step 4's rename and before `latest` named it, a restart resumed from step 2 and
    trained the save interval again: latest() trusts `latest` over higher step numbers (an abandoned
    branch may lie above it). latest.next, written before the rename, names step 4 as the step that
    followed step 2. The restart's own save killed again, once before its rename (the kill's step 4
    must stay the newest: that save names it in `latest` first) and once after it."""
    root = tmp_path / "ckpt"
    _save(root, 2)
    _save(root, 4, die_at=checkpoint.LATEST)
    step4 = str(root / "step_00000004")
    assert _named(root) == "step_00000002" and checkpoint.is_step(Path(step4))
    assert checkpoint.latest(str(root)) == step4
    assert checkpoint.resolve(str(root)) == step4  # checkpoint.init_from, polar score --checkpoint
    _save(root, 6, die_at="step_00000006")  # resumed from step 4, killed at its next save's rename
    assert checkpoint.latest(str(root)) == step4 and _named(root) == "step_00000004"
    _save(root, 6, die_at=checkpoint.LATEST)
    assert checkpoint.latest(str(root)) == str(root / "step_00000006")
    _save(root, 8)
    assert _named(root) == "step_00000008" and checkpoint.latest(str(root)) == str(root / "step_00000008")
    assert not (root / checkpoint.PUBLISHING).exists()


def test_an_abandoned_branch_above_latest_stays_unused(tmp_path):
    """A run that went back to step 2 (`latest` set to it by hand, with steps 4 and 6 of the first
    run above it): those are not resumed. Its save of step 4 again, killed as the old step 4 is moved
    away, leaves latest.next naming step_00000004 after step 2, but the step of that name is still
    the old one: not taken. Killed after the rename, the new one is, while `latest` names step 2
    (written again with that name or not), and no longer once it names another step."""
    root = tmp_path / "ckpt"
    for step in (2, 4, 6):
        _save(root, step, branch="first")
    (root / checkpoint.LATEST).write_text("step_00000002")
    assert checkpoint.latest(str(root)) == str(root / "step_00000002")
    _save(root, 4, die_at="step_00000004.deleting", branch="second")
    assert checkpoint.read_state(str(root / "step_00000004"))["branch"] == "first"
    assert checkpoint.latest(str(root)) == str(root / "step_00000002")
    _save(root, 4, die_at=checkpoint.LATEST, branch="second")
    assert checkpoint.latest(str(root)) == str(root / "step_00000004")
    assert checkpoint.read_state(str(root / "step_00000004"))["branch"] == "second"
    (root / checkpoint.LATEST).write_text("step_00000002\n")  # latest.next's `after` is what it names
    assert checkpoint.latest(str(root)) == str(root / "step_00000004")
    (root / checkpoint.LATEST).write_text("step_00000006")
    assert checkpoint.latest(str(root)) == str(root / "step_00000006")


def test_steps_without_a_save_id_are_found_as_before(tmp_path):
    """Steps saved before latest.next existed (no save_id in their trainer state) and a latest.next
    that names no save: `latest`'s step, else the newest complete step. A checkpoint directory under
    a file has none (looking for latest.next there raised NotADirectoryError)."""
    (tmp_path / "a_file").write_text("")
    assert checkpoint.latest(str(tmp_path / "a_file" / "ckpt")) is None
    for step in (2, 4):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "step_00000004")
    (tmp_path / checkpoint.LATEST).write_text("step_00000002")
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "step_00000002")
    publishing = tmp_path / checkpoint.PUBLISHING
    for text in ("", "\0\0\0\0", "[]", json.dumps({"step": "step_00000004", "after": "step_00000002"}),
                 json.dumps({"step": "step_00000004", "after": "step_00000002", checkpoint.SAVE_ID: "x"}),
                 json.dumps({"step": "../step_00000004", "after": "step_00000002", checkpoint.SAVE_ID: "x"})):
        publishing.write_text(text)
        assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "step_00000002"), text


def test_a_trainer_started_again_after_such_a_kill_resumes_from_that_step(runtime, tmp_path, monkeypatch):
    """The trainer end to end (in this process, one rank): its save of step 4 fails where `latest` is
    written, which leaves what a node lost there leaves (step 4 renamed, `latest` naming step 2). The
    same command started again resumed at step 2 and trained steps 3-4 again; it resumes at step 4."""
    import errno

    from tests.engine.test_trainer import make_trainer

    make_trainer(runtime, tmp_path, "checkpoint.save_interval=2", "train.exit_at_step=2").fit()
    real = checkpoint.durable_file.write_file

    def lost(path, data, **kwargs):
        if Path(path).name == checkpoint.LATEST and data == "step_00000004":
            raise OSError(errno.EIO, "the node was lost")
        real(path, data, **kwargs)

    monkeypatch.setattr(checkpoint.durable_file, "write_file", lost)
    with pytest.raises(checkpoint.CheckpointWriteError, match="the node was lost") as err:
        make_trainer(runtime, tmp_path, "checkpoint.save_interval=2").fit()
    monkeypatch.undo()
    ckpts = tmp_path / "checkpoints"
    assert f"(newest: {ckpts / 'step_00000004'})" in str(err.value), err.value
    assert _named(ckpts) == "step_00000002"
    lines = []
    again = make_trainer(runtime, tmp_path, "checkpoint.save_interval=2", log=lambda *a, **k: lines.append(a[0]))
    assert again.step == 4 and f"resumed from {ckpts / 'step_00000004'} at step 4" in lines, lines
