"""Per-step wall time inside a method, charged to the step that did the work on either device; with
SDSENGINE_TRACE=1 each step's time is also printed as it ends, so a run cut short still shows where its time went
(the run report has the sums only once a layer is done)."""
import os
import sys
import time

import torch


def tracing():
    return os.environ.get("SDSENGINE_TRACE") == "1"


def trace(message):
    """One line on stderr where SDSENGINE_TRACE=1."""
    if tracing():
        print(f"sdsengine: {message}", file=sys.stderr, flush=True)


class Laps(dict):
    """Seconds per step, name -> time since the previous lap (or creation), the device's queue drained first so
    that a GPU step is charged its own work; work between two laps (an error's evaluation) counts in the later.
    method: the name a traced lap is printed under."""

    def __init__(self, device, method):
        super().__init__()
        self._cuda = torch.device(device).type == "cuda"
        self._method = method
        self._last = time.perf_counter()

    def after(self, name, value):
        """value, once the step that made it is timed under `name`."""
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self[name] = self.get(name, 0.0) + now - self._last
        trace(f"{self._method} {name}: {now - self._last:.3f} s")
        self._last = now
        return value

    def running(self):
        """Seconds since the last lap, the queue drained first, without ending a lap (a long step's progress)."""
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - self._last
