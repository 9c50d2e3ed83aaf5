"""What data-parallel pruning (several processes under torchrun: sdsengine/pipeline/parallel.py) gains here: the same
prune in one process with every thread (the baseline), in P processes sharing those threads, and in one process with
one thread, in the same run, each in fresh processes, alone on the machine.

    python benchmarks/bench_parallel.py [--model M] [--methods sparsegpt,wanda] [--processes 2] [--threads 2] \
        [--sparsity 2:4] [--nsamples 16] [--seqlen 512] [--device cpu|cuda] [--name parallel_cpu]

Times are the run reports' `seconds` (the calibration capture and every layer; each process's model load is
outside them). With --device cuda each process takes one GPU (--processes at most the GPUs visible), and the
baseline is one process on one GPU. Writes benchmarks/results/<name>.json and .md: per method and setting, a record
of bench "parallel" with processes, threads (per process), seconds, baseline_seconds and speedup, the peak RSS and
GPU memory of the first process, the largest peak RSS of the others (which load no weights), and the layer errors'
largest ratio to the baseline's (the runs differ by the rounding of sums taken in another order; SparseGPT on
SmolLM2 is that sensitive to it).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import prune_arguments, prune_flags, write_results

COLUMNS = ("bench", "method", "pattern", "device", "processes", "threads", "seconds", "baseline_seconds", "speedup",
           "cpu_peak_rss_gib", "gpu_peak_allocated_gib", "others_cpu_peak_rss_gib", "max_error_ratio")


def prune(args, method, processes, threads, out):
    """The run report of one prune, run by `processes` processes of `threads` threads each."""
    flags = prune_flags(args, method, out)
    if args.model:
        flags += ["--model", args.model]
    launcher = [sys.executable, "-m", "sdsengine.cli"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(processes), "-m", "sdsengine.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(launcher + flags, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{method} with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads((Path(out) / "sdsengine.json").read_text())


def record(args, method, processes, threads, report, baseline):
    errors = [(layer["error"], base["error"]) for layer, base in zip(report["layers"], baseline["layers"])
              if layer["error"] and base["error"]]
    return {"bench": "parallel", "method": method, "pattern": args.sparsity, "device": args.device,
            "processes": processes, "threads": threads, "seconds": report["seconds"],
            "baseline_seconds": baseline["seconds"], "speedup": baseline["seconds"] / report["seconds"],
            **report["memory"], "others_cpu_peak_rss_gib": _others_peak(report),
            "max_error_ratio": max((max(a / b, b / a) for a, b in errors), default=None),
            "calibration": f"{args.calib} {args.nsamples} x {args.seqlen}, seed 0", "model": report["model"]}


def _others_peak(report):
    """The largest peak RSS of the processes after the first (which hold the model's skeleton: the first lends them
    each layer), None in one process."""
    others = [m.get("cpu_peak_rss_gib") for m in report.get("data_parallel", {}).get("memory", [])[1:]]
    return max(others) if others else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    prune_arguments(parser, ["sparsegpt", "wanda"], 16, "parallel_cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the threads of the baseline, shared "
                        "by the processes")
    args = parser.parse_args(argv)
    if args.processes < 2 or args.threads < args.processes:
        parser.error(f"--processes must be at least 2 and --threads at least --processes, got {args.processes} and "
                     f"{args.threads}")
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            runs = {}
            for processes, threads in ((1, args.threads), (args.processes, args.threads // args.processes), (1, 1)):
                if (processes, threads) not in runs:
                    out = f"{scratch}/{method}-{processes}x{threads}"
                    runs[processes, threads] = prune(args, method, processes, threads, out)
            baseline = runs[1, args.threads]
            for (processes, threads), report in runs.items():
                records.append(record(args, method, processes, threads, report, baseline))
                print(f"{method} {args.sparsity}: {processes} process(es) x {threads} thread(s): "
                      f"{report['seconds']:.1f} s ({records[-1]['speedup']:.2f}x)")
    print(f"wrote {write_results(args.name, records, args.out, COLUMNS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
