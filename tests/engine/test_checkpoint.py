import json

from engine import checkpoint


def test_latest_skips_partial_and_incomplete(tmp_path):
    done = tmp_path / "step_00000003"
    done.mkdir()
    (done / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3}))
    (tmp_path / "step_00000006.partial").mkdir()  # killed mid-save
    (tmp_path / "step_00000005").mkdir()  # no trainer state: never completed
    assert checkpoint.latest(str(tmp_path)) == str(done)
    (tmp_path / checkpoint.LATEST).write_text("step_00000003")
    assert checkpoint.latest(str(tmp_path)) == str(done)


def test_latest_on_empty_dir(tmp_path):
    assert checkpoint.latest(str(tmp_path / "nothing")) is None
