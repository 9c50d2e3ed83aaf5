"""N:M keep mask of a score matrix, sdsengine.kernels.nm_mask (Triton, one pass) vs its PyTorch reference (a
stable sort of every group of M on a GPU), on Llama layer shapes, 2:4, fp32 and fp64 scores (SDS ranks fp32
scores, BESA's learned N:M scores are fp64). Every method's N:M step calls this on a GPU, SDS's adjustment 200
times per linear.

A call reads the scores and writes a bool mask. The issues set no target for it; ours is the fused Wanda
kernel's, which does this and more in one pass: at least 0.7 of the copy bandwidth measured in the same run.

    python benchmarks/bench_nm_mask.py [--shapes 4096x4096] [--dtypes float32] [--reps 20] [--budget 60]
    python benchmarks/bench_nm_mask.py --smoke     # tiny shapes; on CPU, Triton runs under its interpreter

Writes benchmarks/results/nm_mask.json (a list of records) and nm_mask.md; see benchmarks/README.md.
"""
import sys

import torch

import harness
from sdsengine.kernels import nm_mask

PATTERNS = ("2:4",)
TARGET = 0.7  # of the copy bandwidth, as fused Wanda's


def measure(case, args):
    n, m = (int(x) for x in case["pattern"].split(":"))
    scores = torch.randn(*case["shape"], dtype=case["dtype"], device=args.device)
    times, out, ref = harness.time_backends(lambda: nm_mask(scores, n, m), args, flush=True)
    nbytes = scores.numel() * (scores.element_size() + 1)  # the scores in, a bool per score out
    bandwidth = harness.bandwidth(nbytes, times["ms"], args.copy_gbps)
    return [harness.record(args, case, **times, mismatch=harness.mismatch((out,), (ref,)), **bandwidth,
                           **harness.target(f"gbps >= {TARGET} x copy", bandwidth["frac_copy_bw"] >= TARGET))]


def main(argv=None):
    return harness.main(__doc__, "nm_mask", PATTERNS, measure, "float32,float64", warmup=3, reps=20, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
