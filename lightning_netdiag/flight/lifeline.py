"""The flight recorder's lifeline: what keeps its window when the process ends without an exception the front end
sees. SIGTERM (a scheduler's preemption, torchrun ending the ranks) and a fork (a child holds a stale copy) here; the
exit of a process whose training did not end (an exception nobody told the front end of) with :func:`at_exit`.
Lightning turns SIGTERM into an exception of its own and needs none of it. Pure Python.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["LIFELINE", "Lifeline", "at_exit"]


_F = TypeVar("_F", bound=Callable[..., Any])


class Lifeline:
    """SIGTERM (a scheduler's preemption; torchrun ending every rank when one failed) kills a process that has no
    handler for it without a word. While an owner (a NetDiag with a flight recorder) is watched and nothing else
    handles SIGTERM, this handler calls each owner's ``terminated()`` (which writes its window to its JSON file),
    then puts the default back and sends the signal again: the process dies as it would have. A handler already
    there is the user's (or their framework's) way out and is left alone; so is a thread that may not set one. A
    signal that comes while an owner is inside one of its calls marked :meth:`held` (a step's row half written, the
    window being written out) waits until that call returns; a second one does not wait. A child forked from the
    process (a multiprocessing pool: its parent ends it with SIGTERM) holds a stale copy of everything: there SIGTERM
    gets its default back as the child starts, and is blocked across the fork so that none reaches the child before
    (Python drops a signal caught between fork and its own reset)."""

    def __init__(self) -> None:
        self.attached: weakref.WeakSet[Any] = weakref.WeakSet()
        self.busy = 0  # held calls in progress
        self.pending = False  # a SIGTERM waits for them
        self.mask: set[int | signal.Signals] | None = None  # the signal mask before a fork, while SIGTERM is blocked
        os.register_at_fork(before=self.before_fork, after_in_parent=self.after_fork, after_in_child=self.forked)

    def before_fork(self) -> None:
        if self.attached:
            self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def after_fork(self) -> None:
        if self.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
            self.mask = None

    def forked(self) -> None:
        self.attached.clear()
        self.busy, self.pending = 0, False
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == self.handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.after_fork()  # a SIGTERM already sent is delivered now, with the default: the child dies

    def watch(self, owner: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, self.handle):
            signal.signal(signal.SIGTERM, self.handle)
            self.attached.add(owner)

    def unwatch(self, owner: Any) -> None:
        self.attached.discard(owner)
        if not self.attached and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self.handle:  # not replaced since
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def handle(self, signum: int, frame: object) -> None:
        if self.busy and not self.pending:
            self.pending = True
            return
        self.deliver(write=not self.busy)

    def deliver(self, write: bool = True) -> None:
        if write:
            for owner in list(self.attached):
                owner.terminated()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def held(self, method: _F) -> _F:
        """A method during which SIGTERM waits."""

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.busy += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.busy -= 1
                if self.pending and not self.busy:
                    self.deliver()

        return call  # type: ignore[return-value]


LIFELINE = Lifeline()


def at_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` when the process ends (until the returned function is called: training ended first)."""
    atexit.register(callback)
    return lambda: atexit.unregister(callback)
