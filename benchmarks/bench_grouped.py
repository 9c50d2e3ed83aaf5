"""A mixture's experts in one launch: the grouped 2:4 kernel (ops.run_grouped, what a packed mixture runs at decode)
against the dense grouped GEMM transformers runs by default (torch._grouped_mm), on the same routed rows, at decode
token counts. Expert shapes of Qwen3-30B-A3B (128 experts, 8 per token) and Mixtral-8x7B (8, 2 per token); random
2:4 weights, random distinct top-k routing (seed 0), L2 overwritten before each call (sdsengine.bench.measure_grouped,
which `sdsengine bench --model` runs on a mixture's own shapes).

    python benchmarks/bench_grouped.py [--tokens 1,4,16,64] [--models qwen3-30b-a3b,mixtral-8x7b] [--iters 20]

ms: as called from Python (the host's work included, as in eager decode); device_ms: the GPU's own time, as a CUDA
graph replays it. tiles_for_all_rows_device_ms: the same kernel with its token tile sized for every token rather
than for the rows an expert gets when the routing is even (the default since 2026-12-02; which serves better is
unmeasured), where the two differ. Writes benchmarks/results/<name>.json (a list of records) and .md; exits with a message where no
CUDA GPU is visible.
"""
import argparse
import sys

import torch

from harness import RESULTS, names_argument, no_gpu, tokens_argument, write_results
from sdsengine.bench import measure_grouped

TOKENS = (1, 2, 4, 8, 16, 32, 64)
# name -> (experts, top_k, hidden, ffn): each expert's gate_up is (2 ffn, hidden), its down (hidden, ffn)
MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=tokens_argument, default=",".join(map(str, TOKENS)))
    parser.add_argument("--models", type=names_argument(MODELS), default=",".join(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"],
                        help="bfloat16 (the default) is what torch._grouped_mm serves on every build")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--name", default="grouped", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    tokens, models = args.tokens, args.models
    if no_gpu("bench_grouped"):
        return 1
    records = []
    for model in models:
        experts, k, hidden, ffn = MODELS[model]
        for proj, shape in {"gate_up": (2 * ffn, hidden), "down": (hidden, ffn)}.items():
            records += measure_grouped(shape, experts, k, tokens, getattr(torch, args.dtype), iters=args.iters,
                                       users=f"{model}:{proj}")
            path = write_results(args.name, records, args.out)  # after each shape: a run cut short keeps them
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    return int(any(r["status"] != "ok" for r in records))


if __name__ == "__main__":
    sys.exit(main())
