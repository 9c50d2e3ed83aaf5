"""2:4 sparse x dense matmul on the Linear shapes of Llama-2-7B and Llama-3-8B, tokens 1..4096, fp16 and bf16:
dense cuBLAS, PyTorch's cuSPARSELt (and CUTLASS on 8.x GPUs), ours, and what SparseLinear's autotuner picks,
all in one run with the speedup against dense. Weights are rotated so every call reads them from HBM.

    python benchmarks/bench_spmm.py [--tokens 1,16,128] [--dtypes float16] [--iters 50]

Writes benchmarks/results/<name>.json (a list of records) and .md, rewritten after each shape; exits with a
message where no CUDA GPU is visible.
"""
import argparse
import sys

import torch

from harness import RESULTS, gpu_info, names_argument, no_gpu, tokens_argument, write_results
from sdsengine import ops
from sdsengine.bench import LLAMA_SHAPES, measure, table

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def llm_shapes():
    """{(out, in): 'llama-2-7b:q,k,v,o llama-3-8b:q,o'}: each shape timed once, its users named."""
    shapes = {}
    for model, layers in LLAMA_SHAPES.items():
        for shape, names in layers.items():
            shapes.setdefault(shape, []).append(f"{model}:{names}")
    return {shape: " ".join(users) for shape, users in shapes.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=tokens_argument, default=",".join(map(str, TOKENS)))
    parser.add_argument("--dtypes", type=names_argument(("float16", "bfloat16")), default="float16,bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--name", default="spmm", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    tokens = args.tokens
    dtypes = args.dtypes
    if no_gpu("bench_spmm"):
        return 1
    print(f"bench_spmm on {gpu_info()}; backends {ops.probe()['backends']}")
    records = []
    for dtype in (getattr(torch, d) for d in dtypes):
        for shape, users in llm_shapes().items():
            rows = measure(shape, tokens, dtype, iters=args.iters, users=users)
            print(table(rows), flush=True)
            records += rows
            path = write_results(args.name, records, args.out)  # after each shape: a run cut short keeps them
    print(f"wrote {path}")
    return int(any(r["status"] == "failed" for r in records))


if __name__ == "__main__":
    sys.exit(main())
