"""Sequential layer-by-layer pruning (the SparseGPT/Wanda protocol).

Inputs of the first decoder layer are captured once. For each layer: accumulate statistics of every
targeted linear's inputs with hooks while computing the dense outputs, prune, then recompute the
layer's outputs with the pruned weights: they are the next layer's inputs, and their distance to the
dense outputs is the layer's reconstruction error. Only the current layer sits on the compute device.
"""
import fnmatch
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from sdsengine.algorithms import algorithm_for
from sdsengine.masks import counted_sparsity, nm_violations

from . import adapters
from .capture import capture_layer_inputs, to_device


@dataclass
class LayerReport:
    index: int
    seconds: float = 0.0
    error: float | None = None  # relative squared error of the layer's output on calibration data
    linears: dict = field(default_factory=dict)  # name -> {"shape", "sparsity", "nm_violations"}
    steps: dict = field(default_factory=dict)  # name -> what the algorithm reports (e.g. errors per step)


def prune_model(model, config, samples=None, progress=True) -> list[LayerReport]:
    """Prune every targeted linear of every decoder layer in place; returns one report per layer."""
    algo = algorithm_for(config)
    layers = adapters.decoder_layers(model)
    targets = [_targets(model, layer, i, config.ignore) for i, layer in enumerate(layers)]
    check_prunable(targets, config.sparsity)
    if algo.STATS is None:
        return [_prune_without_data(i, t, algo, config) for i, t in enumerate(_bar(targets, progress))]
    if samples is None:
        raise ValueError(f"method {config.method!r} needs calibration samples")
    device = torch.device(config.device)
    inps, kwargs = capture_layer_inputs(model, samples, device, _store_device(device, samples, model))
    kwargs = to_device(kwargs, device)
    outs = torch.empty_like(inps)
    reports = []
    for i, layer in enumerate(_bar(layers, progress)):
        reports.append(_prune_layer(i, layer, targets[i], algo, config, inps, outs, kwargs, device))
        inps, outs = outs, inps
    return reports


def _prune_layer(index, layer, targets, algo, config, inps, outs, kwargs, device):
    start = time.perf_counter()
    home = next(layer.parameters()).device
    layer.to(device)
    stats = {name: algo.STATS(adapters.get_weight(m).shape[1], device) for name, m in targets.items()}
    hooks = [m.register_forward_hook(_accumulate(stats[name])) for name, m in targets.items()]
    try:
        run_layer(layer, inps, outs, kwargs, device)
    finally:
        for h in hooks:
            h.remove()
    if hasattr(algo, "prune_layer"):  # block-wise methods (BESA) see the whole layer and its dense outputs
        steps = algo.prune_layer(LayerContext(layer, targets, stats, inps, outs, kwargs, device), config)
    else:
        steps = {name: _prune_linear(algo, module, stats[name], config) for name, module in targets.items()}
    del stats
    error = run_layer(layer, inps, outs, kwargs, device, reference=outs)
    layer.to(home)
    report = _report(index, targets, config.sparsity, time.perf_counter() - start, error)
    report.steps = {name: info for name, info in (steps or {}).items() if info}
    return report


@dataclass
class LayerContext:
    """What a block-wise algorithm gets: the layer on its device, its targeted linears, their input
    statistics, the calibration inputs and the dense outputs (outs), and the layer's keyword arguments."""
    layer: torch.nn.Module
    targets: dict
    stats: dict
    inps: torch.Tensor
    outs: torch.Tensor
    kwargs: dict
    device: torch.device


def _prune_linear(algo, module, stats, config):
    """Per-linear methods return the pruned weight, or (weight, info) where info goes into the report."""
    result = algo.prune(adapters.get_weight(module), stats, config)
    weight, info = result if isinstance(result, tuple) else (result, None)
    adapters.set_weight(module, weight)
    return info


@torch.no_grad()
def run_layer(layer, inps, outs, kwargs, device, reference=None):
    """outs[j] = layer(inps[j]); with `reference` (may alias outs), also the relative error against it."""
    err = ref = 0.0
    for j in range(inps.shape[0]):
        y = adapters.layer_output(layer(inps[j:j + 1].to(device), **kwargs))
        if reference is not None:
            target = reference[j:j + 1].to(device).float()
            err += float((y.float() - target).pow(2).sum())
            ref += float(target.pow(2).sum())
        outs[j:j + 1] = y.to(outs.device)
    return err / max(ref, 1e-30) if reference is not None else None


def _accumulate(stats):
    def hook(module, args, output):
        stats.add_batch(args[0].detach())
    return hook


def _prune_without_data(index, targets, algo, config):
    start = time.perf_counter()
    for module in targets.values():
        adapters.set_weight(module, algo.prune(adapters.get_weight(module), None, config))
    return _report(index, targets, config.sparsity, time.perf_counter() - start, None)


def _targets(model, layer, index, ignore):
    prefix = f"{adapters.layout_for(model).layers}.{index}."
    return {name: m for name, m in adapters.linear_modules(layer).items()
            if not any(fnmatch.fnmatch(prefix + name, pat) for pat in ignore)}


def check_prunable(targets, pattern):
    """Fail before any work if a weight cannot hold the pattern."""
    if not pattern.nm:
        return
    for i, layer_targets in enumerate(targets):
        for name, module in layer_targets.items():
            cols = adapters.get_weight(module).shape[1]
            if cols % pattern.m:
                raise ValueError(f"layer {i} {name}: in_features {cols} is not divisible by M={pattern.m} "
                                 f"of the {pattern} pattern; exclude it with --ignore")


def _report(index, targets, pattern, seconds, error):
    linears = {}
    for name, module in targets.items():
        w = adapters.get_weight(module)
        linears[name] = {"shape": list(w.shape), "sparsity": counted_sparsity(w),
                         "nm_violations": nm_violations(w, *pattern.nm) if pattern.nm else None}
    return LayerReport(index, seconds, error, linears)


def _store_device(device, samples, model):
    """Keep calibration activations on the compute device when two buffers fit in half its free memory."""
    if device.type != "cuda":
        return torch.device("cpu")
    hidden = model.config.hidden_size
    need = 2 * samples.numel() * hidden * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free / 2 else torch.device("cpu")


def _bar(items, progress):
    return tqdm(items, desc="pruning layers", unit="layer", disable=not progress)
