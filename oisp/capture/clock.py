"""Divert timestamps to wall-clock nanoseconds since the epoch, as pcapng wants.

WINDIVERT_ADDRESS.Timestamp is a monotonic clock: eBPFDivert gives
CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns), WinDivert gives
QueryPerformanceCounter ticks. One offset, taken once, maps it to the wall clock.
"""

from __future__ import annotations

import sys
import time

import numpy as np


class KernelClock:
    def __init__(self):
        if sys.platform == "win32":
            # perf_counter is QueryPerformanceCounter there; its resolution is 1/frequency.
            self.ns_per_tick = time.get_clock_info("perf_counter").resolution * 1e9
            ticks_now = time.perf_counter_ns() / self.ns_per_tick
        else:
            self.ns_per_tick = 1.0
            ticks_now = time.monotonic_ns()
        self.offset_ns = time.time_ns() - int(ticks_now * self.ns_per_tick)

    def wall_ns(self, timestamps: np.ndarray) -> np.ndarray:
        ticks = np.asarray(timestamps, dtype=np.int64)
        if self.ns_per_tick != 1.0:
            ticks = (ticks * self.ns_per_tick).astype(np.int64)
        return (ticks + self.offset_ns).astype(np.uint64)
