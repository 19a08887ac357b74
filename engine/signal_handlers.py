"""Where the engine's and polar's signal handlers may be installed: the rule engine/stop_signal.py
(SIGTERM noted during training), engine/interrupt.py (SIGINT and SIGTERM raised in the offline tools),
polar/build_stop.py (SIGTERM raised in a data build) and polar/launch.py (stop signals passed on to
torchrun) share, each with its own action."""
from __future__ import annotations

import signal
import threading


def in_main_thread() -> bool:
    """Python runs signal handlers in the main thread, and signal.signal works there only."""
    return threading.current_thread() is threading.main_thread()


def _default(signum: int):
    # SIGINT's action in a Python process nothing has changed: the handler Python installs at start-up
    # (it raises KeyboardInterrupt), unless SIGINT was ignored then, as in a script's background job
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


def may_handle(signum: int, *, unless_ignored: bool = False) -> bool:
    """Whether a handler for `signum` may be installed here: in the main thread, and where the signal
    still has its default action, so that a program that handles or ignores it itself keeps doing so.
    `unless_ignored`: over any action but SIG_IGN (a launcher, which passes the signal on to its child
    while the child runs and puts the action back after; an ignored signal, a background job's SIGINT
    or nohup's SIGHUP, stays ignored)."""
    if not in_main_thread():
        return False
    action = signal.getsignal(signum)
    return action is not signal.SIG_IGN if unless_ignored else action is _default(signum)
