"""An agent whose wall clock is stepped, for the tests and the storm: what an NTP step (or an
attacker answering NTP) does to one node.

`wall_stepped(step)` is the command that runs `vppmesh` with `time.time` and `time.time_ns`
moved by `step` seconds, set before vppmesh is imported; CLOCK_BOOTTIME, which an NTP step
leaves alone, is untouched. (libfaketime 0.9.10 fails Python's sleeps with EINVAL when it
moves the clock back, so it cannot serve.)
"""

from __future__ import annotations

import sys

_STEPPED = """
import runpy, sys, time
step = float(sys.argv.pop(1))
wall, wall_ns = time.time, time.time_ns
time.time = lambda: wall() + step
time.time_ns = lambda: wall_ns() + int(step * 1e9)
sys.argv[0] = "vppmesh"
runpy.run_module("vppmesh", run_name="__main__", alter_sys=True)
"""


def wall_stepped(step: float) -> list[str]:
    """`python -m vppmesh` with the wall clock moved by `step` seconds; append vppmesh's
    arguments."""
    return [sys.executable, "-c", _STEPPED, str(step)]
