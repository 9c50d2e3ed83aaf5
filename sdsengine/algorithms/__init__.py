"""The registry of pruning methods: name -> (config class, algorithm module).

An algorithm module exposes STATS (a statistics class from stats.py, or None when no calibration is
needed) and either prune(weight (out, in), stats, config) -> pruned weight with exact zeros (or
(weight, info dict) for the run report), or, for block-wise methods, prune_layer(ctx, config) that
prunes ctx.targets in place given a pipeline.sequential.LayerContext and returns {name: info}.
An info may hold "fallback": another weight for that linear. Once the layer is pruned, the pipeline
tries all of the layer's fallbacks together and keeps them if the layer's output error drops (a layer guard).
"""
from sdsengine.config import BESAConfig, MagnitudeConfig, SDSConfig, SparseGPTConfig, WandaConfig

from . import besa, magnitude, sds, sparsegpt, wanda

METHODS = {
    "magnitude": (MagnitudeConfig, magnitude),
    "wanda": (WandaConfig, wanda),
    "sparsegpt": (SparseGPTConfig, sparsegpt),
    "besa": (BESAConfig, besa),
    "sds": (SDSConfig, sds),
}


def register(name, config_class, module):
    METHODS[name] = (config_class, module)


def algorithm_for(config):
    """The module that runs config; a method whose options change its shape picks it with variant()."""
    module = lookup(config.method)[1]
    return module.variant(config) if hasattr(module, "variant") else module


def lookup(name):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]
