"""Where a conversion's time goes, stage by stage, for its manifest's ``timing``.

A slow conversion should name its stage without a profiler. The stages run
nested (a float conversion inside the staged int8 route, the sandboxed probe
awaited inside a float conversion), so the clock charges every moment to the
innermost stage open at that moment: the stages never overlap, and they add
up to the time the clock ran. Deep functions open a stage with ``timed(name)``
without being handed the clock: it is the one ``measuring()`` made current in
this thread, or none (then ``timed`` does nothing, so a conversion run outside
an export costs no bookkeeping). Worker threads do not inherit it; their time
is charged to the stage the thread that waits for them is in.

``STAGES`` is the closed set; docs/converting.md says what each includes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

STAGES = ("load", "probe", "convert", "calibration", "quantizer", "methods", "rewrites", "search", "metadata",
          "write")


class StageClock:
    """Seconds per stage since the clock started, each moment charged to the innermost open stage."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._open: list[str] = []
        self._since = self.started

    def _charge(self, idle_to: str | None = None) -> None:
        """Book the time since the last charge to the open stage (none open: to ``idle_to``, the stage about
        to open, so that the few statements between two stages are counted and the stages add up to the total)."""
        now = time.perf_counter()
        charged = self._open[-1] if self._open else idle_to
        if charged is not None:
            self.seconds[charged] += now - self._since
            self._since = now

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown stage {name!r} (one of {', '.join(STAGES)})")
        self._charge(idle_to=name)
        self._open.append(name)
        try:
            yield
        finally:
            self._charge()
            self._open.pop()

    def book_before(self, name: str, seconds: float) -> None:
        """Count ``seconds`` of work done just before the clock started as stage ``name`` (and in the total):
        a model the caller loaded before handing it over."""
        self.started -= seconds
        self.seconds[name] += seconds

    def move(self, seconds: float, to: str) -> None:
        """Charge ``seconds`` of the open stage to ``to`` instead: work measured inside a call that does two
        stages at once (the converter's own calibration, timed by the sample generator it pulls from)."""
        self._charge()
        if not self._open:
            return
        moved = min(max(seconds, 0.0), self.seconds[self._open[-1]])
        self.seconds[self._open[-1]] -= moved
        self.seconds[to] += moved

    def to_manifest(self) -> dict[str, float]:
        """``<stage>_s`` for every stage and ``total_s``, the time since the clock started (rounded to ms).
        Taken inside a stage, the stages add up to the total (each rounded on its own)."""
        self._charge()
        total = self._since - self.started if self._open else time.perf_counter() - self.started
        return {**{f"{name}_s": round(s, 3) for name, s in self.seconds.items()}, "total_s": round(total, 3)}


_CURRENT: contextvars.ContextVar[StageClock | None] = contextvars.ContextVar("stage_clock", default=None)


@contextlib.contextmanager
def measuring() -> Iterator[StageClock]:
    """The clock ``timed`` charges within this block: the one already running (an export inside an accuracy
    search reports the whole run), else a new one."""
    current = _CURRENT.get()
    if current is not None:
        yield current
        return
    clock = StageClock()
    token = _CURRENT.set(clock)
    try:
        yield clock
    finally:
        _CURRENT.reset(token)


def running() -> bool:
    """Whether a clock runs in this thread (an export then reports into it, as part of a longer run)."""
    return _CURRENT.get() is not None


def timed(name: str) -> contextlib.AbstractContextManager[None]:
    """Charge the time inside this block to stage ``name`` of the current clock (none running: nothing)."""
    clock = _CURRENT.get()
    return clock.stage(name) if clock is not None else contextlib.nullcontext()


def move(seconds: float, to: str) -> None:
    """``StageClock.move`` on the current clock, if one runs."""
    clock = _CURRENT.get()
    if clock is not None:
        clock.move(seconds, to)


def measured_as(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated function as stage ``name`` of the current clock (or a new one), so the exports it
    makes report the whole run: the accuracy search's time as ``search``, its conversions by their stages."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with measuring(), timed(name):
                return fn(*args, **kwargs)

        return run

    return decorate
