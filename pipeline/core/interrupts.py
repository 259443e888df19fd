"""Interrupts stay interrupts: Ctrl-C and SIGTERM end a command as an interrupt wherever they land.

Python raises ``KeyboardInterrupt`` wherever the main thread is when the
signal's handler runs, and inside third-party code it does not always reach
us as one: an extension module whose initialization is interrupted reports
``ImportError: initialization failed`` (pybind11 turns any exception raised
while a module initializes into that), and code that catches ``Exception``
to fall back (a fast path, a converter's error handling) carries on as if
nothing had happened. So around such code (``surfaced``) the handlers also
count what arrived, and an interrupt that arrived inside the block is raised
when the block ends, whatever the block raised or returned.

SIGTERM (what ``kill``, systemd and CI runners send) ends a process at once
by default, skipping every cleanup: temporary folders, sandbox children.
``terminate_as_interrupt`` turns it into an ``Interrupted`` exception, so the
same unwinding runs as for Ctrl-C; the exit code stays the shell's for the
signal (``exit_code``: 130 for SIGINT, 143 for SIGTERM).

``deferred`` holds both signals back over a few statements that must not be
split (renaming a pair of files into place) and delivers them afterwards.

Signal handlers belong to the main thread; outside it these blocks change
nothing (no signal is delivered to another thread's Python code anyway).
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # every signal a handler of this module saw, in order


class Interrupted(KeyboardInterrupt):
    """A signal that ends the command; ``signum`` says which (plain ``KeyboardInterrupt`` means SIGINT)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's exit code for the signal behind ``exc``: 128 + its number."""
    return 128 + getattr(exc, "signum", int(signal.SIGINT))


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside this block SIGTERM raises ``Interrupted(SIGTERM)`` instead of ending the process on the spot."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _replaced(make_handler):
    """Each of SIGNALS whose handler is a Python function gets ``make_handler(previous)`` for the block."""
    saved = {}
    if _in_main_thread():
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous):
                saved[signum] = previous
                signal.signal(signum, make_handler(previous))
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)


def _counting(previous):
    def handler(signum, frame):
        _received.append(signum)
        previous(signum, frame)

    return handler


@contextlib.contextmanager
def surfaced():
    """Around third-party code that may re-type or swallow an interrupt: one that arrived in the block is raised."""
    start = len(_received)
    with _replaced(_counting):
        try:
            yield
        except Exception as exc:
            if len(_received) > start:
                raise Interrupted(_received[start]) from exc
            raise
    if len(_received) > start:
        raise Interrupted(_received[start])


class Held:
    """The signals ``deferred`` is holding back (``pending``: whether any arrived yet)."""

    def __init__(self):
        self.signals: list[int] = []

    def pending(self) -> bool:
        return bool(self.signals)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM back inside the block; each one received is delivered, in order, when it ends.

    Delivered means handed to the handler the block found (``signal.raise_signal``):
    Ctrl-C raises ``KeyboardInterrupt`` right there, a default SIGTERM ends the process.
    """
    held = Held()

    def hold(signum, frame):
        held.signals.append(signum)
        _received.append(signum)

    saved = {}
    if _in_main_thread():
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_IGN and previous is not None:  # None: a handler set outside Python
                saved[signum] = previous
                signal.signal(signum, hold)
    try:
        yield held
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous)
        for received in held.signals:
            signal.raise_signal(received)
