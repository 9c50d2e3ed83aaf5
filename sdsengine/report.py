"""The run report: the recipe, the protocol, library versions, per-layer results, time and memory."""
import dataclasses
import platform
import resource
import sys

import torch

from sdsengine.masks import counted_sparsity


def versions() -> dict:
    import transformers

    import sdsengine
    # threads: CPU results can differ between thread counts in the last bits (BLAS splits its sums by them)
    return {"sdsengine": sdsengine.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


_cpu_peak_kib = 0  # the largest peak RSS read so far in this process


def peak_memory(device) -> dict:
    """Peak resident memory of this process so far and, on CUDA, peak allocated GPU memory.

    Linux folds the current RSS into the peak through per-CPU counters that are read approximately, so a later
    reading can come out a little lower (seen: 1.484 then 1.483 GiB); the running maximum keeps the peak a peak."""
    global _cpu_peak_kib
    _cpu_peak_kib = kib = max(_cpu_peak_kib, _peak_rss_kib())
    out = {"cpu_peak_rss_gib": round(kib / 2 ** 20, 3)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        # the run's device, not the current one (they differ with --device cuda:1)
        index = torch.device(device).index
        out["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(index) / 2 ** 30, 3)
    return out


def _peak_rss_kib() -> int:
    """This process's peak RSS in KiB: Linux's VmHWM, else ru_maxrss. On Linux ru_maxrss starts at the parent's peak
    when the process is forked: a prune started by a process holding 4.9 GiB reported 4.9 GiB whatever it held."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes there, KiB elsewhere


def run_peak(device, layers) -> dict:
    """The run's peaks: this process's, raised to any a layer recorded. A resumed run's earlier processes
    left their peaks only in the reports of the layers they pruned."""
    peaks = peak_memory(device)
    for layer in layers:
        for key, value in layer.memory.items():
            if value is not None:
                peaks[key] = max(peaks.get(key, value), value)
    return peaks


def build(config, calibration, layers, seconds, model_source, memory_at_start=None) -> dict:
    """memory_at_start: peak_memory when the prune began (the process's peaks are the whole process's: a model
    load, or an earlier run in the same Python process, may have set them)."""
    return {
        "model": model_source,
        "recipe": config.to_dict(),
        "calibration": calibration,
        "versions": versions(),
        "seconds": round(seconds, 2),
        "memory": run_peak(config.device, layers),
        "memory_at_start": memory_at_start,
        "layers": [dataclasses.asdict(r) for r in layers],
        "overall_sparsity": overall_sparsity(layers),
    }


def overall_sparsity(layers) -> float:
    """Counted sparsity of the pruned linears (the --ignore'd ones are not in the layer reports)."""
    return weighted_sparsity(_sized(info) for layer in layers for info in layer.linears.values())


def decoder_sparsity(model) -> float:
    """Counted sparsity of every linear of the decoder layers a method may prune, the --ignore'd ones (dense)
    included; a mixture's routers, never pruned, are not (they are linears in some families, bare weights in
    others: counted, the figure differed between families pruned alike)."""
    from sdsengine.pipeline import adapters
    return weighted_sparsity(pair for layer in adapters.decoder_layers(model) for pair in linear_sizes(layer))


def linear_sizes(layer, state=None) -> list[tuple]:
    """(counted sparsity, weight count) of each linear of a decoder layer that a method may prune; state: the layer's
    state dict to count instead of its modules' weights."""
    from sdsengine.pipeline import adapters
    linears = adapters.pruned_linears(layer)
    weights = (state[f"{name}.weight"] if state is not None else adapters.get_weight(m) for name, m in linears.items())
    return [(counted_sparsity(w), w.numel()) for w in weights]


def few_token_experts(layers) -> list[tuple]:
    """(layer, linear, tokens) of the experts' linears that saw fewer calibration tokens than they have inputs: their
    statistics are rank-deficient, so what a method fits to them (SparseGPT's updates, SDS's re-fits) fits those
    few tokens. A router sends some experts few; more calibration windows send them more."""
    return [(r.index, name, info["calibration_tokens"]) for r in layers for name, info in r.linears.items()
            if info.get("calibration_tokens") is not None and info["calibration_tokens"] < info["shape"][1]]


def _sized(info):
    """(counted sparsity, weight count) of one linear's entry in a layer report."""
    return info["sparsity"], info["shape"][0] * info["shape"][1]


def weighted_sparsity(pairs) -> float:
    """Zeros over weights of (sparsity, weight count) pairs: a count, not a mean of the fractions."""
    zeros = total = 0
    for sparsity, n in pairs:
        zeros += sparsity * n
        total += n
    return zeros / total if total else 0.0


def layer_table(layers) -> str:
    """One line per layer, as the log shows it; the peaks are the run's so far, after the layer."""
    gpu = any("gpu_peak_allocated_gib" in r.memory for r in layers)
    head = "layer  sparsity  rel.error   seconds  peak RSS GiB" + ("  peak GPU GiB" if gpu else "")
    rows = [head, "-----  --------  ---------  --------  ------------" + ("  ------------" if gpu else "")]
    for r in layers:
        sp = weighted_sparsity(_sized(info) for info in r.linears.values())
        err = f"{r.error:.3e}" if r.error is not None else "      n/a"
        peaks = [r.memory.get("cpu_peak_rss_gib")] + ([r.memory.get("gpu_peak_allocated_gib")] if gpu else [])
        cells = "".join(f"  {p:12.3f}" if p is not None else f"  {'n/a':>12}" for p in peaks)
        rows.append(f"{r.index:5d}  {sp:8.4f}  {err:>9}  {r.seconds:8.2f}{cells}")
    return "\n".join(rows)
