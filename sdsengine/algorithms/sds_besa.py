"""SDS on BESA's masks (`--method sds --base besa`): BESA learns the block's masks, then SDS reconstructs.

    S  W1  = BESA's masked weights (learned per-row allocation, or learned N:M selection; BESA defaults)
    D  W_re = SDS's re-dense from W1, per linear, from its Hessian                       (sds.redense)
    S  W2  = W_re ⊙ M1, BESA's own mask again: re-learning it would need another block pass per step
       adjust and guard as in sds.reconstruct (per-row counts for unstructured, per group for N:M)

STATS is the Hessian: SDS needs it, and BESA's Wanda ranking reads its diagonal (norms up to a common
scale, which ranks the same).
"""
from sdsengine.pipeline import adapters, parallel

from . import besa, sds
from .least_squares import Objective
from .stats import Hessian

STATS = Hessian


def needs_dense_stream(config):
    return sds.needs_dense_stream(config)


def prune_layer(ctx, config):
    """Prune ctx.targets in place; returns BESA's report with SDS's per-step errors under 'sds'."""
    dense = {name: adapters.get_weight(m).detach().clone() for name, m in ctx.targets.items()}
    info = besa.prune_layer(ctx, config.besa_base())

    def reconstruct(name):
        module = ctx.targets[name]
        w1 = adapters.get_weight(module).float().clone()  # a copy: set_weight below overwrites the module's
        keep = w1 != 0
        objective = Objective(dense[name], ctx.stats[name], config.teacher, config.matmul)
        chosen, steps = sds.reconstruct(objective, w1, config, lambda v: v * keep, keep)
        adapters.set_weight(module, chosen.to(dense[name].dtype))
        own = {**info.get(name, {}), "sds": steps}
        if config.guard == "layer":
            own["fallback"] = w1.to(dense[name].dtype)
        return own
    # each linear by one process of a data-parallel group (pipeline/parallel.py), all of them here otherwise
    return {**info, **parallel.spread(ctx.targets, reconstruct)}

