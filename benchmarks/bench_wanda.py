"""Wanda pruning, sdsengine.kernels.wanda_prune (Triton) vs its PyTorch reference, on Llama layer shapes
(out x in), fp16 and bf16, 2:4 and 50% unstructured (per output row).

A call reads the weight and the per-input norms and writes the pruned weight and the bool keep mask: a
memory-bound pass, held to >= 0.70 of the device copy bandwidth measured in the same run.

    python benchmarks/bench_wanda.py [--shapes 4096x4096] [--dtypes float16] [--reps 50] [--budget 60]
    python benchmarks/bench_wanda.py --smoke        # tiny shapes; on CPU, Triton runs under its interpreter

Writes benchmarks/results/wanda.json (a list of records) and wanda.md; see benchmarks/README.md.
"""
import sys

import torch

import harness
from sdsengine.config import SparsityPattern
from sdsengine.kernels import wanda_prune

PATTERNS = ("2:4", "0.5")
TARGET = 0.70  # fraction of copy bandwidth


def bytes_moved(weight, norms):
    """The fewest bytes a Wanda call must move: W and the norms in, the pruned W and an int8 mask out."""
    return weight.numel() * (2 * weight.element_size() + 1) + norms.numel() * norms.element_size()


def measure(case, args):
    out_features, in_features = case["shape"]
    pattern = SparsityPattern.parse(case["pattern"])
    weight = torch.randn(out_features, in_features, dtype=case["dtype"], device=args.device)
    norms = torch.rand(in_features, device=args.device) + 0.1  # InputNorms.norms(): fp32, positive
    times, out, ref = harness.time_backends(
        lambda: wanda_prune(weight, norms, pattern.sparsity, pattern.nm), args, flush=True)
    rates = harness.bandwidth(bytes_moved(weight, norms), times["ms"], args.copy_gbps)
    return [harness.record(args, case, **times, mismatch=harness.mismatch(out, ref), **rates,
                           **harness.target(f"gbps >= {TARGET} x copy", rates["frac_copy_bw"] >= TARGET))]


def main(argv=None):
    return harness.main(__doc__, "wanda", PATTERNS, measure, "float16,bfloat16", warmup=5, reps=50, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
