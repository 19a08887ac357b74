"""A generic read-ahead: the next result of a preparing function made on a second thread while the
caller works on the one it was given (polar score's chunks, engine/score.py).

The thread is a plain daemon thread with a hand-made result slot, not a concurrent.futures
executor: an executor's worker is joined at interpreter exit, so a preparation that never ends (a
read from a stalled file system) would hold a process that has already failed; a daemon thread is
dropped.
"""
from __future__ import annotations


def prepared_ahead(prepare, last, ahead: bool = True):
    """prepare()'s results, one after another, up to the first of which last(result) is true (not
    yielded). With `ahead`, the next result is prepared on a second thread while the caller works on
    the one it was given, one at most (the host holds two); an exception raised preparing it is
    raised here, to the caller, when the caller asks for that result (after its work on the one
    before, as without `ahead`). The thread is a daemon: a caller leaving early (its own error) is
    never held up by it, and what it prepared is dropped."""
    import threading

    if not ahead:
        while not last(result := prepare()):
            yield result
        return

    def run(slot: dict) -> None:
        try:
            slot["result"] = prepare()
        except BaseException as e:  # raised in the caller's thread, where the run's error handling is
            slot["error"] = e

    def start() -> tuple:
        slot: dict = {}
        thread = threading.Thread(target=run, args=(slot,), name="polar-score-prepare", daemon=True)
        thread.start()
        return thread, slot

    pending = start()
    while True:
        thread, slot = pending
        thread.join()
        if "error" in slot:
            raise slot.pop("error")
        result = slot.pop("result")
        if last(result):
            return
        pending = start()  # the next one, while the caller works on this one
        yield result
        del result  # not held while the next one is prepared on top of it
