"""The benchmarks' one harness.

Timing (CUDA events, median of N, L2 overwritten before each call; the host clock on CPU), GPU and
library versions, device copy bandwidth and the JSON/Markdown records live in sdsengine.bench, shared with
`sdsengine bench`, and are re-exported here. This file adds what the kernel benchmarks (bench_wanda,
bench_sparsegpt, bench_compress) share: their flags, the Llama layer shapes, timing a public function of
sdsengine.kernels under the backend being tested and under the PyTorch reference, the record fields, and a
case loop that keeps to a time budget and rewrites its results after every case.
"""
import argparse
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton runs under its interpreter on CPU; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sdsengine import kernels  # noqa: E402
from sdsengine.bench import (gpu_info, measure_copy_bandwidth, parse_shapes, parse_tokens, table,  # noqa: E402
                             time_ms, write_results)

__all__ = ["RESULTS", "require_transformers", "no_gpu", "names_argument", "tokens_argument", "prune_arguments",
           "prune_flags", "gpu_info",
           "measure_copy_bandwidth", "table", "time_ms", "write_results", "main", "parse_args", "run", "time_backends",
           "record", "bandwidth", "target", "mismatch"]

RESULTS = Path(__file__).resolve().parent / "results"
LAYER_SHAPES = "4096x4096,11008x4096,4096x11008,14336x4096"  # Llama-2-7B q/k/v/o, gate/up, down; Llama-3-8B gate/up
SMOKE_SHAPES = "64x128,96x256"
SMOKE_COPY_BYTES = 16 << 20


def no_gpu(script):
    """True, once said, where no CUDA GPU is visible: the GPU benchmarks then measure nothing."""
    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA GPU visible; nothing measured")
    return True


def names_argument(allowed):
    """An argparse type: a comma-separated list of names, each one of `allowed`; anything else a usage error
    naming them."""
    def parse(text):
        names = [name for name in text.split(",") if name]
        if not names or set(names) - set(allowed):
            raise argparse.ArgumentTypeError(f"takes any of {', '.join(allowed)}, got {text!r}")
        return names
    return parse


def prune_arguments(parser, methods, nsamples, name):
    """The flags of the benchmarks that run `sdsengine prune` (bench_parallel, bench_streaming), with their defaults:
    methods (a list), nsamples, and the results file stem."""
    parser.add_argument("--methods", type=names_argument(("magnitude", "wanda", "sparsegpt", "sds", "besa")),
                        default=methods)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--nsamples", type=int, default=nsamples)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=name, help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")


def prune_flags(args, method, out):
    """`sdsengine prune`'s arguments for method, as prune_arguments' flags set them, seed 0, saving to out."""
    return ["prune", "--method", method, "--sparsity", args.sparsity, "--calib", args.calib, "--nsamples",
            str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0", "--device", args.device, "--out", out]


def tokens_argument(text):
    """parse_tokens as an argparse type: a bad list of token counts is a usage error (argparse names the flag)."""
    try:
        return parse_tokens(text, flag="")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def require_transformers(minimum, why):
    """Stop with the reason where the installed transformers is older than a benchmark needs (sdsengine itself
    takes 4.45 and later; the model benchmarks call what came later)."""
    import transformers
    have = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if have < minimum:
        raise SystemExit(f"this benchmark needs transformers >= {'.'.join(map(str, minimum))} ({why}); this is "
                         f"{transformers.__version__}")


def parse_args(doc, bench, dtypes, warmup, reps, argv=None):
    """The kernel benchmarks' shared flags; the defaults of dtypes, warmup and reps are the bench's own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help=f"shapes {SMOKE_SHAPES}, 1 warmup + 2 reps (CPU too)")
    p.add_argument("--shapes", default=None, help=f"OUTxIN list (default {LAYER_SHAPES})")
    p.add_argument("--dtypes", default=dtypes, help=f"default {dtypes}")
    p.add_argument("--reps", type=int, default=None, help=f"timed calls per measurement, median (default {reps})")
    p.add_argument("--budget", type=float, default=float("inf"),
                   help="seconds; cases not started by then are recorded as skipped")
    p.add_argument("--backend", default="triton", choices=["triton", "torch"],
                   help="the side under test (the baseline is always the torch reference)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--name", default=None, help=f"results file stem (default {bench}, or {bench}-smoke)")
    args = p.parse_args(argv)
    args.bench, args.device = bench, "cuda" if torch.cuda.is_available() else "cpu"
    names = [d for d in args.dtypes.split(",") if d]
    if not names or not all(isinstance(getattr(torch, d, None), torch.dtype) for d in names):
        p.error(f"--dtypes takes torch dtype names such as float16,bfloat16, got {args.dtypes!r}")
    try:
        args.shapes = parse_shapes(args.shapes or (SMOKE_SHAPES if args.smoke else LAYER_SHAPES))
    except ValueError as exc:
        p.error(str(exc))
    args.dtypes = [getattr(torch, d) for d in names]
    args.warmup, args.reps = (1, args.reps or 2) if args.smoke else (warmup, args.reps or reps)
    args.name = args.name or (f"{bench}-smoke" if args.smoke else bench)
    args.started = time.monotonic()
    return args


def main(doc, bench, patterns, measure, dtypes, warmup, reps, argv=None, baseline_reps=None):
    """A kernel benchmark's whole run: its flags, then `run`; returns the exit code, 1 where a case failed (the
    suite's step table must not read ok over failed records). baseline_reps: the reference's timed calls where
    fewer than reps (a reference call of a second is timed exactly once: the call whose output is checked
    warmed it up)."""
    args = parse_args(doc, bench, dtypes, warmup, reps, argv)
    fewer = baseline_reps and baseline_reps < args.reps
    args.baseline_timing = (0, baseline_reps) if fewer else (args.warmup, args.reps)
    records = run(args, patterns, measure)
    return int(any(r["status"] == "failed" for r in records))


def run(args, patterns, measure):
    """measure(case, args) -> records, for each shape x dtype x pattern, until args.budget seconds have passed;
    later cases are recorded as skipped, one that raises as failed. Results are rewritten after each case,
    so a run stopped by its time limit leaves what it measured."""
    args.copy_gbps = measure_copy_bandwidth(SMOKE_COPY_BYTES if args.smoke else 1 << 30)
    print(f"{args.bench}: {args.backend} vs torch on {args.device}; copy bandwidth {args.copy_gbps:.0f} GB/s; "
          f"{gpu_info()}", flush=True)
    deadline = args.started + args.budget  # the copy measurement counts against the budget too
    records = []
    for case in ({"shape": s, "dtype": d, "pattern": p} for s in args.shapes for d in args.dtypes for p in patterns):
        if time.monotonic() > deadline:
            records.append(_status(args, case, "skipped", "time budget spent"))
        else:
            records += _attempt(args, case, measure)
        write_results(args.name, records, args.out)
    print(table(records))
    print(f"wrote {Path(args.out) / args.name}.json and .md")
    return records


def _attempt(args, case, measure):
    try:
        rows = measure(case, args)
    except Exception as exc:  # a kernel error or OOM in one case is a result; the other cases still run
        rows = [_status(args, case, "failed", f"{type(exc).__name__}: {exc}"[:400])]
    for r in rows:
        print(f"{r['bench']} {r['shape']} {r['dtype']} {r['pattern']}: {r['status']} "
              f"{r.get('ms', 0):.4g} ms vs {r.get('baseline_ms', 0):.4g} ms, target met: {r.get('target_met')}",
              flush=True)
    return rows


def _status(args, case, status, why):
    return {**_case_fields(args, case), "status": status, "error": why}


def _case_fields(args, case):
    out_features, in_features = case["shape"]
    return {"bench": args.bench, "shape": f"{out_features}x{in_features}",
            "dtype": str(case["dtype"]).removeprefix("torch."), "pattern": case["pattern"],
            "backend": args.backend, "baseline": "torch", "device": args.device, "reps": args.reps,
            "baseline_reps": getattr(args, "baseline_timing", (0, args.reps))[1]}


def time_backends(fn, args, flush):
    """(times, output under args.backend, output under the torch reference); fn() calls sdsengine.kernels.

    times: ms under each (per call, as used eagerly) and, on a GPU, device_ms: args.backend's GPU time
    alone, its host side hidden (ops.time_ms). Where ms exceeds device_ms, the call waits on its host side."""
    times, outputs = {}, []
    for backend, name in ((args.backend, "ms"), ("torch", "baseline_ms")):
        warmup, reps = (args.warmup, args.reps) if name == "ms" else args.baseline_timing
        with kernels.use_backend(backend):
            outputs.append(fn())
            times[name] = time_ms(fn, warmup, reps, flush=flush)
            if name == "ms" and args.device == "cuda":
                times["device_ms"] = time_ms(fn, args.warmup, args.reps, flush=flush, hide_host=True)
    return times, *outputs


def record(args, case, ms, baseline_ms, **fields):
    """One measurement: the case, both times, the speedup over the reference, then the bench's own fields."""
    return {**_case_fields(args, case), "ms": ms, "baseline_ms": baseline_ms, "speedup": baseline_ms / ms,
            **fields, "status": "ok"}


def bandwidth(nbytes, ms, copy_gbps):
    """GB/s of the bytes a call must read plus write, and its fraction of the copy bandwidth of this run."""
    gbps = nbytes / ms / 1e6
    return {"bytes": nbytes, "gbps": gbps, "copy_gbps": copy_gbps, "frac_copy_bw": gbps / copy_gbps}


def target(text, met):
    return {"target": text, "target_met": bool(met)}


def mismatch(outputs, refs):
    """Largest fraction of elements differing between two tuples of tensors (masks and packed data match exactly)."""
    return max(float((a != b).float().mean()) for a, b in zip(outputs, refs))
