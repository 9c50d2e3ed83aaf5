"""2:4 select-and-compress, sdsengine.kernels.compress_24 (Triton) vs its PyTorch reference and vs a plain
device copy of the same weight, on Llama layer shapes (out x in), fp16 and bf16.

A call reads W and writes half of it as values plus 4 bits of metadata per group of 4; the bar (xFormers'
sparsify24 runs at 1.75-2x a copy) is at most 2x the time of copying W, measured in the same run.

    python benchmarks/bench_compress.py [--shapes 4096x4096] [--dtypes float16] [--reps 50] [--budget 60]
    python benchmarks/bench_compress.py --smoke     # tiny shapes; on CPU, Triton runs under its interpreter

Writes benchmarks/results/compress.json (a list of records) and compress.md; see benchmarks/README.md.
"""
import sys

import torch

import harness
from sdsengine.kernels import compress_24

PATTERNS = ("2:4",)
TARGET = 2.0  # at most this many times the copy of W


def bytes_moved(weight):
    """The fewest bytes a compress must move: W in, half of W and its 4-bit metadata out."""
    return weight.numel() * weight.element_size() * 3 // 2 + weight.numel() // 8


def measure(case, args):
    weight = torch.randn(*case["shape"], dtype=case["dtype"], device=args.device)
    times, out, ref = harness.time_backends(lambda: compress_24(weight), args, flush=True)
    ms = times["ms"]
    copy = torch.empty_like(weight)
    copy_ms = harness.time_ms(lambda: copy.copy_(weight), args.warmup, args.reps, flush=True)
    return [harness.record(args, case, **times, copy_ms=copy_ms, vs_copy=ms / copy_ms,
                           mismatch=harness.mismatch(out, ref), **harness.bandwidth(bytes_moved(weight), ms, args.copy_gbps),
                           **harness.target(f"ms <= {TARGET} x copy of W", ms <= TARGET * copy_ms))]


def main(argv=None):
    return harness.main(__doc__, "compress", PATTERNS, measure, "float16,bfloat16", warmup=5, reps=50, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
