"""Per-step wall time inside a method, charged to the step that did the work on either device."""
import time

import torch


class Laps(dict):
    """Seconds per step, name -> time since the previous lap (or creation), the device's queue drained first so
    that a GPU step is charged its own work; work between two laps (an error's evaluation) counts in the later."""

    def __init__(self, device):
        super().__init__()
        self._cuda = torch.device(device).type == "cuda"
        self._last = time.perf_counter()

    def after(self, name, value):
        """value, once the step that made it is timed under `name`."""
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self[name] = self.get(name, 0.0) + now - self._last
        self._last = now
        return value
