"""engine/read_ahead.py: prepared_ahead, the read-ahead of polar score's chunks (engine/score.py)."""
from __future__ import annotations

import threading

import pytest

from engine.read_ahead import prepared_ahead


def test_an_error_preparing_the_next_chunk_is_raised_after_the_work_on_this_one():
    """The next result is prepared while the caller works on this one; an exception raised preparing
    it reaches the caller, the same object, only when the caller asks for it, and a caller that stops
    early (its own error) is not held up by a preparation that never ends."""
    made, blocked = [], threading.Event()

    def prepare():
        made.append(threading.current_thread() is threading.main_thread())
        if len(made) == 3:
            raise ValueError("in.jsonl:3: not valid JSON")
        return len(made)

    got = []
    with pytest.raises(ValueError) as caught:
        for item in prepared_ahead(prepare, lambda item: item is None):
            got.append(item)
    assert got == [1, 2] and made == [False] * 3  # the caller's work on item 2 done, then item 3's error
    assert str(caught.value) == "in.jsonl:3: not valid JSON"

    made.clear()
    assert list(prepared_ahead(prepare, lambda item: item == 2, ahead=False)) == [1] and made == [True] * 2

    def stuck():  # a preparation that ends when the test lets it
        made.append(None)
        if len(made) > 1:
            blocked.wait()
        return len(made)

    def stop_on_first():
        for _ in prepared_ahead(stuck, lambda item: False):
            raise RuntimeError("the caller's own error")

    made.clear()
    left = threading.Thread(target=lambda: pytest.raises(RuntimeError, stop_on_first), daemon=True)
    left.start()
    left.join(60)  # a guard: the caller leaves at once, not after the stuck preparation
    stuck_too = left.is_alive()
    blocked.set()
    assert not stuck_too and made == [None, None]


@pytest.mark.parametrize("ahead", [True, False])
def test_one_result_at_most_is_prepared_ahead_of_the_callers(ahead):
    """The host holds two chunks, not the input: while the caller works on result k, prepare() has
    been called k + 1 times at most (k + 1 once the next one was started, k without `ahead`), and
    the result that ends the run is not yielded."""
    calls, seen = [], []

    def prepare():
        calls.append(len(calls) + 1)
        return calls[-1]

    for item in prepared_ahead(prepare, lambda item: item == 5, ahead=ahead):
        # the next preparation may still be running: wait for nothing, count what was started
        seen.append((item, len(calls)))
    assert [item for item, _ in seen] == [1, 2, 3, 4]
    assert all(started <= item + 1 for item, started in seen), seen
    if not ahead:
        assert all(started == item for item, started in seen), seen
    assert calls == [1, 2, 3, 4, 5]
