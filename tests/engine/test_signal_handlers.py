"""engine/signal_handlers.py: where the engine's and polar's handlers may be installed."""
from __future__ import annotations

import signal
import threading

import pytest

from engine.signal_handlers import may_handle


@pytest.fixture
def actions():
    """Sets SIGTERM's and SIGINT's actions for a test; puts this process's back after it."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield signal.signal
    for s, action in before.items():
        signal.signal(s, action)


@pytest.mark.parametrize("sig, action, default, launcher", [
    (signal.SIGTERM, signal.SIG_DFL, True, True),
    (signal.SIGINT, signal.default_int_handler, True, True),  # Python's own, installed at start-up
    (signal.SIGINT, signal.SIG_DFL, False, True),  # set by the program: its choice
    (signal.SIGTERM, signal.SIG_IGN, False, False),  # nohup's SIGHUP, a background job's SIGINT
    (signal.SIGTERM, lambda *_: None, False, True),  # a program's own handler
])
def test_over_the_default_action_only_or_for_a_launcher_over_any_but_an_ignored_signal(
        actions, sig, action, default, launcher):
    actions(sig, action)
    assert (may_handle(sig), may_handle(sig, unless_ignored=True)) == (default, launcher)


def test_never_outside_the_main_thread(actions):
    actions(signal.SIGTERM, signal.SIG_DFL)
    seen = []
    thread = threading.Thread(target=lambda: seen.extend([may_handle(signal.SIGTERM),
                                                          may_handle(signal.SIGTERM, unless_ignored=True)]))
    thread.start()
    thread.join()
    assert seen == [False, False] and may_handle(signal.SIGTERM)
