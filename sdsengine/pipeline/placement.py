"""Where modules sit while the pipeline runs them: on the compute device for a block, and back where they were after.

In a data-parallel group the processes after the first may hold the model as a skeleton (its parameters on the meta
device: no memory), and the first one then lends them each module for its block (parallel.lent). A model streamed
from its checkpoint (streaming.py) is a skeleton in every process, lent its weights by the files."""
import contextlib
import itertools

import torch

from . import parallel


@contextlib.contextmanager
def visiting(modules, device, weights=None):
    """Each of `modules` on `device` inside the block, and back where it was after, whatever happens there: a layer an
    OOM or Ctrl-C left on the GPU split the model across devices, and the next prune took the GPU for that layer's
    home. A skeleton's modules are lent theirs by `weights` (a streaming.WeightStream) where given, else by the first
    process of a group (parallel.lent)."""
    with weights.lent(modules, device) if weights is not None else contextlib.nullcontext():
        # a module with buffers only (rotary embeddings) has its home where its buffers are
        homes = [(m, _home(m)) for m in modules if not parallel.is_skeleton(m)]
        for module, _ in homes:
            module.to(device)
        try:
            with parallel.lent(modules, device):
                yield
        finally:
            for module, home in homes:
                module.to(home)


def _home(module):
    return next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device
