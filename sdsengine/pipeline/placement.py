"""Where modules sit while the pipeline runs them: on the compute device for a block, and back where they were after.

In a data-parallel group the processes after the first may hold the model as a skeleton (its parameters on the meta
device: no memory), and the first one then lends them each module for its block (parallel.lent)."""
import contextlib
import itertools

import torch

from . import parallel


@contextlib.contextmanager
def visiting(modules, device):
    """Each of `modules` on `device` inside the block, and back where it was after, whatever happens there: a layer an
    OOM or Ctrl-C left on the GPU split the model across devices, and the next prune took the GPU for that layer's
    home. A skeleton's modules are lent theirs by the first process instead (parallel.lent)."""
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
