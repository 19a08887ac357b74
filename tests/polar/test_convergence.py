"""The convergence guard: the shrunk default recipe reproduces its recorded loss curve, and a run
that does not learn (train.lr=0) is reported by the same comparison.

Golden file: tests/assets/losses/tiny_cpu.json (band and reason inside); re-record it with
`python tests/assets/losses/record.py` when training is meant to change."""
import pytest

from tests.polar import convergence as guard


# The end-of-run checkpoint changes no loss compared here and no test reads its weights: the runs skip it.
NO_CHECKPOINT = "checkpoint.save_at_end=false"


@pytest.fixture(scope="module")
def golden():
    return guard.load_golden()


def test_golden_file_is_a_curve_that_learns(golden):
    assert guard.learned(golden) == []
    assert golden["command"].startswith("python engine/pretrain.py") and golden["versions"]["torch"]
    assert set(golden["tolerance"]) == {*guard.CURVE_KEYS, *guard.FINAL_KEYS}
    assert all(golden["curve"][s].keys() == set(guard.CURVE_KEYS) for s in golden["curve"])


def test_default_recipe_stays_on_its_recorded_curve(golden, tmp_path):
    summary = guard.run_recipe(tmp_path / "run", NO_CHECKPOINT)
    assert guard.compare(summary, golden) == []


def test_guard_fails_when_the_learning_rate_is_zero(golden, tmp_path):
    """With lr=0 the weights never move, so the curve is the same whatever train.steps is: 15 steps
    suffice to show it, and the comparison must report values outside the band at the steps that ran
    (not only the steps that are missing)."""
    summary = guard.run_recipe(tmp_path / "lr0", "train.lr=0", "train.steps=15", NO_CHECKPOINT)
    problems = guard.compare(summary, golden)
    out_of_band = [p for p in problems if "lm_loss" in p and "outside" in p]
    assert {"step 10", "step 15"} <= {p.split(":")[0] for p in out_of_band}, problems
    assert any(p.startswith("after training:") for p in problems), problems


def _summary(golden, **shift):
    history = [dict(step=int(s), **{k: v + shift.get(k, 0.0) for k, v in row.items()})
               for s, row in golden["curve"].items()]
    return {"history": history, **{k: v + shift.get(k, 0.0) for k, v in golden["final"].items()}}


def test_compare_accepts_the_band_and_rejects_beyond_it(golden):
    """The comparison itself, without training: inside the band passes, just outside fails, a missing
    step or a NaN fails."""
    band = golden["tolerance"]["loss"]["atol"]
    assert guard.compare(_summary(golden), golden) == []
    assert guard.compare(_summary(golden, loss=0.8 * band), golden) == []
    assert len(guard.compare(_summary(golden, loss=1.2 * band), golden)) == len(golden["curve"])
    off = guard.compare(_summary(golden, held_out_loss=-1.2 * golden["tolerance"]["held_out_loss"]["atol"]), golden)
    assert len(off) == 1 and off[0].startswith("after training: held_out_loss")
    short = _summary(golden)
    short["history"] = short["history"][:-1]
    assert guard.compare(short, golden) == [f"step {max(golden['curve'], key=int)}: not in the run's history "
                                            f"(logged steps: {[r['step'] for r in short['history']]})"]
    nan = _summary(golden)
    nan["history"][0]["lm_loss"] = float("nan")
    assert len(guard.compare(nan, golden)) == 1
