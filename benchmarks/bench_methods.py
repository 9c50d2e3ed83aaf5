"""Each pruning method's time and peak memory on a GPU, on a random-weight model of a real shape (time and memory do
not depend on the weights' values): Llama-2-7B's decoder layers, cut to --layers, fp16, kept on the CPU and pruned
layer by layer on the GPU as `sdsengine prune --device cuda` does, calibrated on random token ids (--nsamples
windows of --seqlen tokens). Quality is measured on the CPU, on the real model and real data (docs/QUALITY.md);
this measures what the SDS and BESA issues ask beside it: seconds per layer and peak GPU memory, against the
baselines run the same way.

    python benchmarks/bench_methods.py [--model llama-2-7b] [--layers 1] [--nsamples 64] [--seqlen 2048]
                                       [--methods magnitude,wanda,sparsegpt,sds,sds-wanda,sds-tf32,besa]
                                       [--budget 300]

Every method prunes its own copy of the same model to 2:4, in the order given; none starts after --budget seconds.
Writes benchmarks/results/<name>.json (a list of records) and .md after each method; a SIGTERM (the suite's step
limit) ends the method in progress with a record of how long it had run, written before the process exits (124).
Exits with a message where no CUDA GPU is visible.
"""
import argparse
import contextlib
import copy
import signal
import sys
import time

import torch

from bench_e2e import CONFIGS, model_config
from harness import RESULTS, gpu_info, names_argument, no_gpu, write_results
from sdsengine import BESAConfig, MagnitudeConfig, SDSConfig, SparseGPTConfig, WandaConfig, prune

METHODS = {  # name -> the method's config at 2:4 on `device`, each at its defaults
    "magnitude": lambda device: MagnitudeConfig(sparsity="2:4", device=device),
    "wanda": lambda device: WandaConfig(sparsity="2:4", device=device),
    "sparsegpt": lambda device: SparseGPTConfig(sparsity="2:4", device=device),
    "sds": lambda device: SDSConfig(sparsity="2:4", device=device),
    "sds-wanda": lambda device: SDSConfig(sparsity="2:4", base="wanda", device=device),
    "sds-tf32": lambda device: SDSConfig(sparsity="2:4", matmul="tf32", device=device),
    "besa": lambda device: BESAConfig(sparsity="2:4", device=device),
}


def measure_method(model, name, calibration, device, shape):
    """One record: `name` pruning a copy of `model` (left as it is) on `device`: seconds in all and per decoder
    layer, and the run's peak memory (GPU allocated where the device is CUDA; the process's RSS)."""
    pruned = copy.deepcopy(model)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = prune(pruned, METHODS[name](device), calibration=calibration, progress=False)
    seconds = time.perf_counter() - start
    memory = result.report.get("memory", {})
    return {"bench": "methods", "method": name, "pattern": "2:4", "shape": shape, "layers": len(result.layers),
            "nsamples": int(calibration.shape[0]), "seqlen": int(calibration.shape[1]), "device": str(device),
            "seconds": seconds, "seconds_per_layer": seconds / len(result.layers),
            "gpu_peak_allocated_gib": memory.get("gpu_peak_allocated_gib"),
            "cpu_peak_rss_gib": memory.get("cpu_peak_rss_gib"), "step_seconds": step_seconds(result.layers),
            "status": "ok"}


def step_seconds(layers):
    """Seconds per step summed over every linear, where the method times its steps (SDS: its base's prune, the
    re-dense, the second prune, the adjustment, the refit, the swaps; BESA per block: the learner's setup, the
    learning steps, the hard-mask checks, applying the masks); None where it does not."""
    total = {}
    for layer in layers:
        for info in layer.steps.values():
            for step, seconds in info.get("seconds", {}).items():
                total[step] = total.get(step, 0.0) + seconds
    return total or None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-7b",
                        choices=[name for name, config in CONFIGS.items() if "model_type" not in config])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--methods", type=names_argument(METHODS), default=",".join(METHODS))
    parser.add_argument("--budget", type=float, default=300, help="seconds after which no method starts")
    parser.add_argument("--name", default="methods", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if no_gpu("bench_methods"):
        return 1
    from transformers import AutoModelForCausalLM
    config = model_config(args.model, args.layers, args.seqlen)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()  # on the CPU, as prune keeps it
    calibration = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen))
    shape = f"{args.model}/{args.layers}of{CONFIGS[args.model]['num_hidden_layers']}layers"
    print(f"bench_methods: {shape}, {args.nsamples} x {args.seqlen} random tokens; {gpu_info()}")
    records, start = [], time.perf_counter()
    with stopped_by_sigterm():
        for name in args.methods:
            if time.perf_counter() - start > args.budget:
                records.append({"bench": "methods", "method": name, "shape": shape, "status": "skipped (budget)"})
            else:
                records.append(measure_or_cut(model, name, calibration, "cuda", shape))
            path = write_results(args.name, records, args.out)  # after each method: a run cut short keeps them
            if records[-1]["status"] == "cut":
                print(f"wrote {path}; {name} cut by SIGTERM", flush=True)
                return 124
    print(f"wrote {path}")
    return 0


class Stopped(Exception):
    """The process was sent SIGTERM (the GPU suite's step limit) while a method ran."""


@contextlib.contextmanager
def stopped_by_sigterm():
    """Inside: SIGTERM raises Stopped in the main thread (between two Python steps, so within a CUDA call's
    time), where it would end the process at once and lose the method in progress (12-04: BESA's)."""
    def stop(signum, frame):
        raise Stopped()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure_or_cut(model, name, calibration, device, shape):
    """measure_method, or, where SIGTERM stopped it, a `cut` record with the seconds it had run: a lower
    bound on the method's time (SDSENGINE_TRACE=1 prints its steps' times as they end)."""
    start = time.perf_counter()
    try:
        record = measure_method(model, name, calibration, device, shape)
    except Stopped:
        seconds = time.perf_counter() - start
        return {"bench": "methods", "method": name, "pattern": "2:4", "shape": shape, "status": "cut",
                "seconds_at_cut": seconds, "error": f"stopped by SIGTERM after {seconds:.0f} s, unfinished"}
    print(f"{name}: {record['seconds']:.1f} s, GPU peak {record['gpu_peak_allocated_gib']} GiB; "
          f"by step: {record['step_seconds']}", flush=True)
    return record


if __name__ == "__main__":
    sys.exit(main())
