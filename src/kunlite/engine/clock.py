"""Where the engine's policies read the time: the real clocks, or a simulation's virtual one.

`now()` is monotonic seconds (for durations: steps, windows, pauses), `wall()` unix seconds
(for events a person reads). The scheduling side (instances, the parameter-centric policy,
migration) takes a Clock, so that `kunlite simulate` runs the very same code in virtual time.
"""

from __future__ import annotations

import time


class Clock:
    def now(self) -> float:
        return time.perf_counter()

    def wall(self) -> float:
        return time.time()


REAL = Clock()


class VirtualClock(Clock):
    """Time that moves only when the simulation says so."""

    def __init__(self, start_wall: float = 0.0) -> None:
        self.t = 0.0
        self.start_wall = start_wall

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.start_wall + self.t

    def advance_to(self, t: float) -> None:
        if t > self.t:
            self.t = t
