"""Sequential layer-by-layer pruning (the SparseGPT/Wanda protocol).

Inputs of the first decoder layer are captured once. For each layer: accumulate statistics of every
targeted linear's inputs with hooks while computing the dense outputs, prune, then recompute the
layer's outputs with the pruned weights: they are the next layer's inputs, and their distance to the
dense outputs is the layer's reconstruction error. Only the current layer sits on the compute device.

A method may also ask for the dense stream (needs_dense_stream(config)): the activations of the unpruned
model, carried alongside. Each linear's statistics then also see its dense-model inputs (stats.add_batch(x,
dense_x)), and the layer context holds the dense model's layer outputs (dense_outs). It costs one more
forward pass per layer and two more activation buffers. Such a method fits the dense model's outputs, so
the layer guard and the layer's reported error are then against the dense model's outputs of the layer.

With config.sequential == "linear" (GPTQ's "true sequential"), per-linear methods prune a layer's linears
group by group in forward order (a group: the linears that read the same input, like q/k/v), each group on
inputs that already pass through the pruned groups before it. The first pass is the full dense forward
(its outputs are the reference); each later group's pass stops once the group has seen its inputs.
"""
import contextlib
import fnmatch
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from sdsengine.algorithms import algorithm_for, magnitude
from sdsengine.masks import counted_sparsity, nm_violations
from sdsengine.report import peak_memory

from . import adapters, experts, memory, parallel, placement
from .capture import capture_layer_inputs, to_device


@dataclass
class LayerReport:
    index: int
    seconds: float = 0.0
    error: float | None = None  # relative squared error of the layer's output on calibration data
    linears: dict = field(default_factory=dict)  # name -> {"shape", "sparsity", "nm_violations"}
    steps: dict = field(default_factory=dict)  # name -> what the algorithm reports (e.g. errors per step)
    # peak memory once this layer is done, as the run's report has it (process RSS; on CUDA, allocated GPU
    # memory): peaks only grow, so the layer where one rises is the one that set the run's peak
    memory: dict = field(default_factory=dict)


def prune_model(model, config, samples=None, progress=True, resume=None, weights=None) -> list[LayerReport]:
    """Prune every targeted linear of every decoder layer in place; returns one report per layer.
    resume: a ResumeStore (methods with calibration data): keeps the progress after every layer and
    continues from it; another run's progress is refused before the inputs are captured.
    weights: a streaming.WeightStream that lends a skeleton each module's weights for its turn and writes each
    pruned layer out."""
    algo = algorithm_for(config)
    parallel.check(config)
    parallel.same_model(model)
    progress = progress and parallel.rank() == 0  # one bar and one log for a group of processes
    layers, targets = plan_targets(model, config)
    if algo.STATS is None:
        return [_prune_without_data(i, layers[i], t, algo, config, weights)
                for i, t in enumerate(_bar(targets, progress))]
    if samples is None:
        raise ValueError(f"method {config.method!r} needs calibration samples")
    if resume:
        resume.identify(model, config, samples, weights)  # all the windows, in every process of a group
    samples = parallel.share(samples)  # data-parallel: this process's windows (pipeline/parallel.py)
    device = torch.device(config.device)
    need, store = activation_plan(model, config, samples)
    if progress:
        print(f"calibration activations: {memory.describe(need)} on {store}", file=sys.stderr)
    inps, layer_kwargs = capture_layer_inputs(model, samples, device, store, weights)
    outs = torch.empty_like(inps)
    dense = DenseStream(inps.clone(), torch.empty_like(inps)) if needs_dense_stream(algo, config) else None
    reports = resume.begin(layers, inps, dense, LayerReport, weights) if resume else []
    for i in _bar(range(len(reports), len(layers)), progress, initial=len(reports), total=len(layers)):
        kwargs = to_device(layer_kwargs[i], device)
        reports.append(_prune_layer(i, layers[i], targets[i], algo, config, inps, outs, kwargs, device, dense,
                                    weights))
        inps, outs = outs, inps
        if dense is not None:
            dense.inps, dense.outs = dense.outs, dense.inps
        if resume:
            resume.save(layers, reports, inps, dense, weights)
    return reports


@dataclass
class DenseStream:
    """The unpruned model's activations: inputs of the current layer, and a buffer for its outputs."""
    inps: torch.Tensor
    outs: torch.Tensor


def needs_dense_stream(algo, config):
    return bool(getattr(algo, "needs_dense_stream", lambda c: False)(config))


def _prune_layer(index, layer, targets, algo, config, inps, outs, kwargs, device, dense=None, weights=None):
    start = time.perf_counter()
    # the report counts the weights inside the block: a skeleton's are only lent there
    with placement.visiting([layer], device, weights):
        steps, error = _prune_layer_here(layer, targets, algo, config, inps, outs, kwargs, device, dense)
        report = _report(index, targets, config, time.perf_counter() - start, error)
    report.steps = {name: info for name, info in (steps or {}).items() if info}
    return report


def _prune_layer_here(layer, targets, algo, config, inps, outs, kwargs, device, dense):
    """(each linear's step info, the layer's relative output error) of pruning the layer, on the device."""
    steps = {}
    if not targets:  # every linear ignored: the layer only passes its inputs (and the dense stream's) on
        collect_stats(layer, targets, {}, inps, outs, kwargs, device, dense)
    elif hasattr(algo, "prune_layer"):  # block-wise methods (BESA) see the whole layer and its dense outputs
        stats = _new_stats(algo, targets, device)
        collect_stats(layer, targets, stats, inps, outs, kwargs, device, dense)
        steps, reached = _prune_unreached(targets, stats, config)
        if reached:
            ctx = LayerContext(layer, reached, stats, inps, outs, kwargs, device, dense and dense.outs)
            steps.update(algo.prune_layer(ctx, config) or {})
            del ctx
        del stats
    else:
        groups = linear_groups(layer, targets, inps[:1], kwargs, device) if config.sequential == "linear" else [targets]
        # the dense stream is the unpruned model's: once a group is pruned, later groups' passes run the
        # dense stream through the layer's original weights (swapped in by reference, not copied per window)
        unpruned = {m: m.weight.data.clone() for m in targets.values()} if dense is not None and len(groups) > 1 else {}
        for g, group in enumerate(groups):
            stats = _new_stats(algo, group, device)
            # the first pass also computes the dense outputs (the reference); later ones stop early
            collect_stats(layer, group, stats, inps, outs if g == 0 else None, kwargs, device, dense, unpruned)
            unreached, reached = _prune_unreached(group, stats, config)
            steps.update(unreached)
            steps.update(parallel.spread(reached, lambda name: _prune_linear(algo, reached[name], stats[name], config)))
            del stats
        del unpruned
    fallbacks = {name: info.pop("fallback") for name, info in (steps or {}).items() if info and "fallback" in info}
    # a method that asked for the dense stream fits the dense model's outputs: the guard judges, and the
    # report measures, against those; otherwise against the dense layer on the same (pruned) inputs
    reference = dense.outs if dense is not None else outs
    if fallbacks:
        return steps, layer_guard(layer, targets, fallbacks, steps, inps, outs, kwargs, device, reference)
    return steps, run_layer(layer, inps, outs, kwargs, device, reference=reference)


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
    dense_outs: torch.Tensor | None = None  # the dense model's outputs of this layer, if the method asked


def _new_stats(algo, targets, device):
    return {name: algo.STATS(adapters.get_weight(m).shape[1], device) for name, m in targets.items()}


@torch.no_grad()
def linear_groups(layer, targets, window, kwargs, device) -> list[dict]:
    """The targets in the order the layer's forward calls them, grouped by shared input (q/k/v read the
    same tensor; o_proj reads attention's output): one forward of `window` with recording hooks. Targets
    the forward never calls form a last group."""
    calls = []

    def hook_for(name):
        def hook(module, args, output):
            calls.append((name, args[0]))
        return hook

    hooks = [m.register_forward_hook(hook_for(name)) for name, m in targets.items()]
    try:
        _forward(layer, window, kwargs, device)
    finally:
        for h in hooks:
            h.remove()
    groups, last_input = [], None
    for name, x in calls:
        if x is not last_input:
            groups.append({})
            last_input = x
        groups[-1][name] = targets[name]
    unseen = {name: m for name, m in targets.items() if all(name not in g for g in groups)}
    return _merged_experts(groups, unseen)


def _merged_experts(groups, unseen=None):
    """One group per projection of a mixture's experts (every expert's gate_up_proj, then every down_proj), where
    the forward made one per expert and projection: experts read the same tokens in one pass, so a pass per
    expert (of 128, say) would only repeat it. Experts the first window did not reach join their projection's
    group, one by one: taken together with the other unseen linears, an expert's down_proj was pruned in the pass
    of its own gate_up_proj, on inputs its pruned gate_up_proj never shaped. Other unseen linears form a last
    group."""
    merged = {}
    for group in groups:
        merged.setdefault(frozenset(map(experts.role, group)), {}).update(group)
    rest = {}
    for name, module in (unseen or {}).items():
        role = experts.role(name)
        if role == name:  # no expert's: with the other unseen linears
            rest[name] = module
        else:
            merged.setdefault(frozenset([role]), {})[name] = module
    return list(merged.values()) + ([rest] if rest else [])


def layer_guard(layer, targets, fallbacks, steps, inps, outs, kwargs, device, reference=None):
    """Keep the chosen weights, or all fallback weights together if they give a lower output error against
    `reference` (default: the dense outputs in `outs`). Like run_layer, leaves the kept weights' outputs in
    `outs` and returns their error; each linear's steps[name]["layer_guard"] records both errors and what
    was kept."""
    reference = outs if reference is None else reference
    chosen = {name: adapters.get_weight(targets[name]).detach().clone() for name in fallbacks}
    _set_weights(targets, fallbacks)
    errors = {"fallback": run_layer(layer, inps, None, kwargs, device, reference=reference)}
    _set_weights(targets, chosen)
    errors["chosen"] = run_layer(layer, inps, outs, kwargs, device, reference=reference)  # the usual final pass
    kept = "fallback" if errors["fallback"] < errors["chosen"] else "chosen"
    if kept == "fallback":  # rare: one more pass, for the outputs the next layer reads
        _set_weights(targets, fallbacks)
        run_layer(layer, inps, outs, kwargs, device)
    for name in fallbacks:
        # a method may describe its fallback weights (BESA: their allocation); kept, that is what the model holds
        own = steps[name].pop("fallback_info", None)
        if kept == "fallback" and own is not None:
            steps[name] = own
        steps[name]["layer_guard"] = {**errors, "kept": kept}
    return errors[kept]


def _set_weights(targets, weights):
    for name, weight in weights.items():
        adapters.set_weight(targets[name], weight)


def _prune_unreached(targets, stats, config):
    """(steps, the other targets): the linears no calibration token reached, pruned by magnitude. An expert the
    router never picked in the calibration windows has empty statistics, on which Wanda's scores all tie and
    SparseGPT takes every input for dead and zeroes the whole weight; its weights' sizes are all there is to go
    by. Each one's steps say so. Each expert's linear also keeps its token count, for the report."""
    for name, module in targets.items():
        if experts.role(name) != name:  # an expert's linear (ours, for the prune): the report gives its token count
            module.calibration_tokens = stats[name].tokens
    unreached = {name: m for name, m in targets.items() if stats[name].tokens == 0}
    for module in unreached.values():
        adapters.set_weight(module, magnitude.prune(adapters.get_weight(module), None, config))
    steps = {name: {"calibration_tokens": 0, "pruned_by": "magnitude"} for name in unreached}
    return steps, {name: m for name, m in targets.items() if name not in unreached}


def _prune_linear(algo, module, stats, config):
    """Per-linear methods return the pruned weight, or (weight, info) where info goes into the report."""
    result = algo.prune(adapters.get_weight(module), stats, config)
    weight, info = result if isinstance(result, tuple) else (result, None)
    adapters.set_weight(module, weight)
    return info


@torch.no_grad()
def run_layer(layer, inps, outs, kwargs, device, reference=None):
    """outs[j] = layer(inps[j]) (outs None: not kept); with `reference` (may alias outs), also the relative
    error against it."""
    # the sums stay on the device (each window's fp32 sum added in fp64, as Python floats would add them):
    # reading them per window stopped a GPU for the host twice a window
    err = ref = torch.zeros((), dtype=torch.float64, device=device)
    for j in range(inps.shape[0]):
        y = _forward(layer, inps[j:j + 1], kwargs, device)
        if reference is not None:
            target = reference[j:j + 1].to(device).float()
            err = err + (y.float() - target).pow(2).sum().double()
            ref = ref + target.pow(2).sum().double()
        if outs is not None:
            outs[j:j + 1] = y.to(outs.device)
    if reference is None:
        return None
    parallel.summed(err, ref)  # data-parallel: over every process's windows
    return float(err) / max(float(ref), 1e-30)


class _StopForward(Exception):
    """Raised by a hook once every linear of interest has seen the window: the rest of the forward is moot."""


@torch.no_grad()
def collect_stats(layer, targets, stats, inps, outs, kwargs, device, dense=None, unpruned=None):
    """outs = layer(inps), adding every targeted linear's inputs to its stats. With a dense stream, each
    window first runs the dense stream (dense.outs[j] = layer(dense.inps[j])), with the weights in
    `unpruned` ({module: its original weight tensor}) in place of the modules' own, and the inputs each
    linear saw there go to its stats beside the pruned-stream ones. Linears that read one tensor come to
    share one statistics object in `stats`, accumulated once (_add_once). outs=None: no outputs are kept
    (dense.outs neither), and each forward stops as soon as every target has seen its input."""
    seen = {}  # linear name -> its input on the dense stream, for the current window
    phase = ["pruned"]
    fired = set()
    fed = []  # (statistics, the input it took) for the current window, pruned stream

    def hook_for(name):
        def hook(module, args, output):
            x = args[0]  # not detached here: identity tells which linears read the same tensor
            if phase[0] == "dense":
                seen[name] = (x.detach(), getattr(module, "routed_tokens", None))
            else:
                dense_x = None if dense is None else _dense_input(seen.pop(name, None), module, x)
                _add_once(stats, name, x, dense_x, fed)
            fired.add(name)
            if outs is None and len(fired) == len(targets):
                raise _StopForward
        return hook

    def run(x):
        fired.clear()
        try:
            return _forward(layer, x, kwargs, device)
        except _StopForward:
            return None
        finally:
            fed.clear()  # holds the window's inputs: let them go

    hooks = [m.register_forward_hook(hook_for(name)) for name, m in targets.items()]
    try:
        for j in range(inps.shape[0]):
            if dense is not None:
                seen.clear()  # an expert the dense stream reached in the last window only
                phase[0] = "dense"
                with _weights_swapped(unpruned or {}):
                    y = run(dense.inps[j:j + 1])
                if outs is not None:
                    dense.outs[j:j + 1] = y.to(dense.outs.device)
                phase[0] = "pruned"
            y = run(inps[j:j + 1])
            if outs is not None:
                outs[j:j + 1] = y.to(outs.device)
    finally:
        for h in hooks:
            h.remove()
    if stats:
        parallel.merge_stats(stats)  # data-parallel: every process's windows in every process's statistics


def _dense_input(seen, module, x):
    """The dense stream's input to `module` in this window, row for row with x (None: it had none). A mixture's
    expert sees the tokens its router picked, which may differ between the two streams: experts.paired lines them
    up."""
    tokens = getattr(module, "routed_tokens", None)
    if tokens is None:
        return None if seen is None else seen[0]
    return experts.paired(x, tokens, *(seen or (None, None)))


@contextlib.contextmanager
def _weights_swapped(weights):
    """{module: weight tensor} in place of each module's own weight tensor (no copies), restored after."""
    own = {module: module.weight.data for module in weights}
    try:
        for module, weight in weights.items():
            module.weight.data = weight
        yield
    finally:
        for module, weight in own.items():
            module.weight.data = weight


def _add_once(stats, name, x, dense_x, fed):
    """Add this window's input x to stats[name], sharing: linears that read the same tensor (q/k/v, gate/up)
    end up holding one statistics object, accumulated once per window (for a Hessian, the in² work per token
    that dominates a statistics pass). stats[name] is replaced by the shared object on the first window."""
    own = stats[name]
    taken = [s for s, seen in fed if seen is x]
    if taken and (own is taken[0] or own.tokens == 0):
        stats[name] = taken[0]
        return
    if any(s is own for s, _ in fed):
        raise RuntimeError(f"{name}: its statistics are shared with a linear whose input differs in this window")
    own.add_batch(x.detach(), dense_x)
    fed.append((own, x))


def _forward(layer, x, kwargs, device):
    return adapters.layer_output(layer(x.to(device), **kwargs))


def _prune_without_data(index, layer, targets, algo, config, weights=None):
    """Magnitude: each weight pruned where --device says, like every other method's, then moved home."""
    start = time.perf_counter()
    with placement.visiting([layer], config.device, weights):
        for module in targets.values():
            adapters.set_weight(module, algo.prune(adapters.get_weight(module), None, config))
        return _report(index, targets, config, time.perf_counter() - start, None)


def plan_targets(model, config):
    """(decoder layers, each one's linears to prune), checked before any work: an --ignore pattern that
    names no module, or a weight that cannot hold the pattern, is refused by name."""
    layers = adapters.decoder_layers(model)
    _check_only_linears(model, layers)
    targets = [_targets(model, layer, i, config.ignore) for i, layer in enumerate(layers)]
    _check_ignore_matches(model, layers, config.ignore)
    if not any(targets):  # a run that would save the model unchanged as a "pruned" checkpoint
        if not any(adapters.linear_modules(layer) for layer in layers):
            raise ValueError("the decoder layers hold no prunable linears (nn.Linear or GPT-2's Conv1D)")
        raise ValueError(f"--ignore {','.join(config.ignore)} covers every linear of the decoder layers: nothing "
                         "is left to prune")
    check_prunable(targets, config.sparsity, adapters.layout_for(model).layers)
    return layers, targets


def _check_only_linears(model, layers):
    """Every weight matrix of a decoder layer must sit in a linear the methods prune (or --ignore keeps dense, and
    decoder_sparsity counts): one outside them (a mixture-of-experts layer's fused expert bank) would be left dense
    while the report gave the layer the target sparsity."""
    prefix = adapters.layout_for(model).layers
    stray = {f"{prefix}.{i}.{name}": shape for i, layer in enumerate(layers)
             for name, shape in adapters.unprunable_weights(layer).items()}
    if stray:
        name, shape = next(iter(stray.items()))
        raise ValueError(f"{len(stray)} weight(s) of the decoder layers sit outside nn.Linear, such as {name} of shape "
                         f"{shape}: sdsengine cannot prune them (a mixture-of-experts layer's fused experts), and "
                         "would leave them dense while reporting the layers pruned; this layout is not supported")


def _targets(model, layer, index, ignore):
    """The layer's linears that no --ignore pattern names, by their own name or a containing module's."""
    prefix = f"{adapters.layout_for(model).layers}.{index}."
    return {name: m for name, m in adapters.pruned_linears(layer).items()
            if not any(fnmatch.fnmatch(prefix + name, pat) or fnmatch.fnmatch(prefix + name, pat + ".*")
                       for pat in ignore)}


def _check_ignore_matches(model, layers, ignore):
    """A pattern that names no module of the model is a typo (a missing prefix, say): name it and what names
    look like. One naming a module that is never pruned (lm_head) has nothing to do, which is fine."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [pat for pat in ignore if not any(fnmatch.fnmatch(name, pat) for name in names)]
    if unmatched:
        prefix = adapters.layout_for(model).layers
        examples = [f"{prefix}.{i}.{name}" for i, layer in enumerate(layers) for name in adapters.linear_modules(layer)]
        # a mixture's checkpoint shows fused banks (mlp.experts.gate_up_proj); the pruned linears are per expert
        expert = next((e for e in examples if experts.role(e) != e), None)
        more = f" and, for an expert, {expert!r}" if expert else ""
        raise ValueError(f"--ignore pattern(s) {unmatched} match no module of the model; names look like "
                         f"{examples[0]!r}{more}")


def check_prunable(targets, pattern, prefix):
    """Fail before any work if a weight cannot hold the pattern, or holds inf/NaN (which every method would
    keep or spread: SparseGPT's updates carry one NaN along its row). prefix: the decoder layers' name in the model
    (layout.layers), for the --ignore pattern a refusal suggests."""
    for i, layer_targets in enumerate(targets):
        for name, module in layer_targets.items():
            weight = adapters.get_weight(module)
            if pattern.nm and weight.shape[1] % pattern.m:
                raise ValueError(f"layer {i} {name}: in_features {weight.shape[1]} is not divisible by M={pattern.m} "
                                 f"of the {pattern} pattern; exclude it with --ignore{_every_expert(prefix, name)}")
            if bad := non_finite(weight):
                raise ValueError(f"layer {i} {name}: the weight holds {bad} inf/NaN values; a damaged checkpoint "
                                 "cannot be pruned")


def _every_expert(prefix, name):
    """A mixture's experts share their shapes: the pattern that names this projection of every expert of every
    layer (one expert's name would only move the refusal on to the next expert)."""
    role = experts.role(name)
    return "" if role == name else f" (every expert's: --ignore '{prefix}.*.{role}')"


def non_finite(weight, chunk=1 << 20):
    """The count of inf/NaN values in weight, a slice of a million values at a time: torch.isfinite takes the absolute
    values of what it is given, and with its masks it held 3x an fp32 weight (a 0.8 GB embedding peaked 2.4 GB
    higher); slices of 16M values still took a streamed layer's lending (streaming.py) to 2.2x the layer, 1.25x now."""
    if weight.is_meta:  # a skeleton's (data-parallel: the first process checks the weights it lends; a dry run)
        return 0
    flat = weight.reshape(-1)
    return sum(int(part.numel() - torch.isfinite(part).sum()) for part in flat.split(chunk))


def _report(index, targets, config, seconds, error):
    pattern = config.sparsity
    linears = {}
    for name, module in targets.items():
        w = adapters.get_weight(module)
        violations = nm_violations(w, *pattern.nm) if pattern.nm else None
        _refuse_broken(f"layer {index} {name}", w, violations, config)
        linears[name] = {"shape": list(w.shape), "sparsity": counted_sparsity(w), "nm_violations": violations}
        if (tokens := getattr(module, "calibration_tokens", None)) is not None:
            linears[name]["calibration_tokens"] = tokens
    return LayerReport(index, seconds, error, linears, memory=peak_memory(config.device))


def _refuse_broken(where, weight, violations, config):
    """Stop rather than report (and save) a weight a method broke: inf/NaN, from calibration inputs that
    overflowed, or a group outside the pattern, a bug."""
    # the weights are the model's own by now: in Python the model holds them until it is loaded again
    stopped = "the run stops here, nothing is saved (a model in Python holds them: load it again)"
    if bad := non_finite(weight):
        raise RuntimeError(f"{where}: {config.method} left {bad} inf/NaN weights (did the layer's calibration "
                           f"inputs overflow?); {stopped}")
    if violations:
        raise RuntimeError(f"{where}: {config.method} left {violations} groups outside the {config.sparsity} "
                           f"pattern (a bug: please report it); {stopped}")


def activation_plan(model, config, samples):
    """(bytes, device) of the calibration activations that a prune on `samples` (this process's windows) keeps between
    layers; refuses before any work if they cannot fit there."""
    need = memory.activation_bytes(model, *samples.shape, needs_dense_stream(algorithm_for(config), config))
    store = memory.store_device(torch.device(config.device), need)
    hosted = need if store.type == "cpu" else 0  # data-parallel: a machine's processes share its host memory
    what = f"the calibration activations of {samples.shape[0]} windows x {samples.shape[1]} tokens"
    memory.check_fits(need, store, what, "lower --nsamples or --seqlen", parallel.on_this_machine(hosted) - hosted)
    return need, store


def _bar(items, progress, **kwargs):
    return tqdm(items, desc="pruning layers", unit="layer", disable=not progress, **kwargs)
