"""Fault points: where a test stops the process on purpose, to signal or kill it at exactly that point.

A timer cannot hit a window of a few microseconds (between two renames) every
time; a fault point can. With ``XEDGE_TEST_PAUSE=NAME:FILE`` in the
environment, ``pause(NAME)`` writes this process's pid to FILE and waits: until
a signal handler raises (Ctrl-C, ``interrupts.terminate_as_interrupt``), until
``stop()`` says so (a signal ``interrupts.deferred`` holds back), or for 10
minutes, so that a test that never signals cannot leave the process behind for
ever. Without the variable, or with another NAME, it returns at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

PAUSE_ENV = "XEDGE_TEST_PAUSE"
_LIMIT_S = 600


def pause(name: str, stop: Callable[[], bool] | None = None) -> None:
    wanted, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    if wanted != name or not marker:
        return
    Path(marker).write_text(str(os.getpid()))
    deadline = time.monotonic() + _LIMIT_S
    while time.monotonic() < deadline and not (stop and stop()):
        time.sleep(0.05)
