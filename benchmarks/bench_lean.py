"""What a lean converted model saves and what it costs, in one run: a compressed checkpoint (written by
`sdsengine convert`) as loaded, then with set_lean (no decompressed copies of its weights). Per token count,
the time of one forward (batch 1, only the last position's logits); per mode, the bytes its linear weights
hold once run (sdsengine.nn.weight_bytes: compressed weights plus every form derived from them).

    python benchmarks/bench_lean.py --model DIR [--tokens 1,256] [--device cpu] [--dtype bfloat16]

Writes benchmarks/results/<name>.json and .md: one record per token count, bench "lean", ms (lean) against
baseline_ms (as loaded) and their ratio as speedup, weight_mib against baseline_weight_mib and against
dense_weight_mib (what the same weights hold as plain nn.Linear).
"""
import argparse
import sys

import torch

from harness import RESULTS, gpu_info, require_transformers, time_ms, write_results
from sdsengine.bench import parse_tokens
from sdsengine.nn import SparseLinear, load_compressed, set_lean, weight_bytes


def measure(model, tokens, reps):
    """{tokens: ms} of one forward each, then the linear weights' bytes as held after them."""
    device = next(model.parameters()).device
    times = {}
    with torch.no_grad():
        for n in tokens:
            ids = torch.randint(0, model.config.vocab_size, (1, n), device=device,
                                generator=torch.Generator(device).manual_seed(n))
            times[n] = time_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), 2, reps)
    return times, sum(weight_bytes(model).values())


def dense_bytes(model):
    """What the linear weights would hold as plain nn.Linear: the converted ones decompressed, once."""
    sparse = sum(m.out_features * m.in_features * m.values.element_size() for m in model.modules()
                 if isinstance(m, SparseLinear))
    return sparse + weight_bytes(model)["dense"]


def main(argv=None):
    require_transformers((4, 56), "logits_to_keep")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a compressed checkpoint directory (sdsengine convert)")
    parser.add_argument("--tokens", default="1,256", help="token counts of the timed forwards")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: the dtype the checkpoint was saved in")
    parser.add_argument("--reps", type=int, default=5, help="timed forwards per token count (median)")
    parser.add_argument("--name", default="lean", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    tokens = parse_tokens(args.tokens)
    model = load_compressed(args.model)
    model.to(args.device, getattr(torch, args.dtype) if args.dtype else None)
    base_ms, base_bytes = measure(model, tokens, args.reps)
    set_lean(model)
    lean_ms, lean_bytes = measure(model, tokens, args.reps)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    records = [{"bench": "lean", "model": args.model, "tokens": n, "dtype": dtype, "gpu": gpu_info()["gpu"],
                "ms": lean_ms[n], "baseline_ms": base_ms[n], "speedup": base_ms[n] / lean_ms[n],
                "weight_mib": lean_bytes / 2**20, "baseline_weight_mib": base_bytes / 2**20,
                "dense_weight_mib": dense_bytes(model) / 2**20} for n in tokens]
    for r in records:
        print(f"{r['tokens']} tokens: {r['baseline_ms']:.1f} -> {r['ms']:.1f} ms ({r['speedup']:.3f}x), linear "
              f"weights {r['baseline_weight_mib']:.0f} -> {r['weight_mib']:.0f} MiB (nn.Linear: "
              f"{r['dense_weight_mib']:.0f} MiB)")
    print(f"wrote {write_results(args.name, records, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
