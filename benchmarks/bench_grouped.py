"""A mixture's experts in one launch: the grouped 2:4 kernel (ops.run_grouped, what a packed mixture runs at decode)
against the dense grouped GEMM transformers runs by default (torch._grouped_mm), on the same routed rows, at decode
token counts. Expert shapes of Qwen3-30B-A3B (128 experts, 8 per token) and Mixtral-8x7B (8, 2 per token); random
2:4 weights, random distinct top-k routing (seed 0), L2 overwritten before each call.

    python benchmarks/bench_grouped.py [--tokens 1,4,16,64] [--models qwen3-30b-a3b,mixtral-8x7b] [--iters 20]

ms: as called from Python (the host's work included, as in eager decode); device_ms: the GPU's own time, as a CUDA
graph replays it. Writes benchmarks/results/<name>.json (a list of records) and .md; exits with a message where no
CUDA GPU is visible.
"""
import argparse
import sys

import torch

from harness import RESULTS, gpu_info, time_ms, write_results
from sdsengine import ops
from sdsengine.bench import parse_tokens
from sdsengine.kernels import compress_24, decompress_24
from sdsengine.masks import nm_mask
from sdsengine.nn.grouped import device_routes

TOKENS = (1, 2, 4, 8, 16, 32, 64)
# name -> (experts, top_k, hidden, ffn): each expert's gate_up is (2 ffn, hidden), its down (hidden, ffn)
MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}


def expert_shapes(experts, hidden, ffn):
    return {"gate_up": (2 * ffn, hidden), "down": (hidden, ffn)}


def routing(tokens, experts, k, device, seed=0):
    """k distinct experts per token, as a router's topk picks them."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)


def random_experts(experts, shape, dtype, device="cuda"):
    """(dense 2:4 weights [E, out, in], the grouped form of the same)."""
    g = torch.Generator(device=device).manual_seed(0)
    dense = torch.empty(experts, *shape, device=device, dtype=dtype)
    pairs = []
    for e in range(experts):
        w = torch.randn(*shape, device=device, dtype=dtype, generator=g)
        pairs.append(compress_24(w * nm_mask(w.abs(), 2, 4)))
        dense[e] = decompress_24(*pairs[-1])
    return dense, ops.grouped_form(pairs)


def measure(model, proj, shape, experts, k, dense, form, tokens, dtype, iters):
    index = routing(tokens, experts, k, dense.device)
    token, _, offsets, groups = device_routes(index, experts)
    x = torch.randn(tokens, shape[1], device=dense.device, dtype=dtype)[token]
    ends = offsets[1:]  # torch._grouped_mm's offs: where each expert's rows end
    base = {"bench": "grouped", "layers": f"{model}:{proj}", "shape": f"{experts}x{shape[0]}x{shape[1]}",
            "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "gpu": gpu_info()["gpu"],
            "backend": "sdsengine", "baseline": "torch._grouped_mm"}
    sparse = lambda: ops.run_grouped(form, x, offsets, groups, tokens, None, shape[0])  # noqa: E731
    grouped_mm = lambda: torch._grouped_mm(x, dense.transpose(1, 2), offs=ends)  # noqa: E731
    try:
        ref = ops.grouped_reference(x, dense, offsets, groups, tokens)
        err = ops.relative_error(sparse(), ref)
        dense_err = ops.relative_error(grouped_mm(), ref)
        times = {name: (time_ms(fn, 5, iters, flush=True), time_ms(fn, 5, iters, flush=True, hide_host=True))
                 for name, fn in (("sparse", sparse), ("dense", grouped_mm))}
    except (RuntimeError, AttributeError) as exc:  # a torch without _grouped_mm for this dtype or GPU: a result
        return dict(base, status="failed", error=str(exc)[:400])
    active = len(set(index.flatten().tolist()))
    read = active * shape[0] * shape[1] * dtype.itemsize * 9 / 16  # the compressed bytes of the experts with rows
    (ms, device_ms), (dense_ms, dense_device_ms) = times["sparse"], times["dense"]
    bad = max(err, dense_err) > 1e-2
    return dict(base, ms=ms, device_ms=device_ms, dense_ms=dense_ms, dense_device_ms=dense_device_ms,
                speedup=dense_ms / ms, device_speedup=dense_device_ms / device_ms, tbps=read / device_ms / 1e9,
                rel_err=err, mismatch=bad, status="wrong" if bad else "ok")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"],
                        help="bfloat16 (the default) is what torch._grouped_mm serves on every build")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--name", default="grouped", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    try:
        tokens = parse_tokens(args.tokens)
    except ValueError as exc:
        parser.error(str(exc))
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        parser.error(f"--models takes {', '.join(MODELS)}, got {args.models!r}")
    if not torch.cuda.is_available():
        print("bench_grouped: no CUDA GPU visible; nothing measured")
        return 1
    dtype = getattr(torch, args.dtype)
    records = []
    for model in models:
        experts, k, hidden, ffn = MODELS[model]
        for proj, shape in expert_shapes(experts, hidden, ffn).items():
            dense, form = random_experts(experts, shape, dtype)
            records += [measure(model, proj, shape, experts, k, dense, form, n, dtype, args.iters) for n in tokens]
            path = write_results(args.name, records, args.out)  # after each shape: a run cut short keeps them
            del dense, form
    print(f"wrote {path}")
    return int(any(r["status"] != "ok" for r in records))


if __name__ == "__main__":
    sys.exit(main())
