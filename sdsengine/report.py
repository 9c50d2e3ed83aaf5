"""The run report: the recipe, the protocol, library versions, per-layer results, time and memory."""
import dataclasses
import platform
import resource
import sys

import torch


def versions() -> dict:
    import transformers

    import sdsengine
    return {"sdsengine": sdsengine.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def cpu_peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2 ** 20 if sys.platform != "darwin" else peak / 2 ** 30, 3)


def peak_memory(device) -> dict:
    """Peak resident memory of this process and, on CUDA, peak allocated GPU memory."""
    out = {"cpu_peak_rss_gib": cpu_peak_rss_gib()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return out


def build(config, calibration, layers, seconds, model_source) -> dict:
    return {
        "model": model_source,
        "recipe": config.to_dict(),
        "calibration": calibration,
        "versions": versions(),
        "seconds": round(seconds, 2),
        "memory": peak_memory(config.device),
        "layers": [dataclasses.asdict(r) for r in layers],
        "overall_sparsity": overall_sparsity(layers),
    }


def overall_sparsity(layers) -> float:
    zeros = total = 0
    for layer in layers:
        for info in layer.linears.values():
            n = info["shape"][0] * info["shape"][1]
            zeros += info["sparsity"] * n
            total += n
    return zeros / total if total else 0.0


def layer_table(layers) -> str:
    rows = ["layer  sparsity  rel.error   seconds", "-----  --------  ---------  --------"]
    for r in layers:
        sp = sum(v["sparsity"] for v in r.linears.values()) / max(len(r.linears), 1)
        err = f"{r.error:.3e}" if r.error is not None else "      n/a"
        rows.append(f"{r.index:5d}  {sp:8.4f}  {err:>9}  {r.seconds:8.2f}")
    return "\n".join(rows)
