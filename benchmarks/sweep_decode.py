"""The mma.sp decode kernel (csrc/spmm24_sm80.cu) with X staged in one shared-memory buffer (the default) or two
(`x_buffers=2`: the next chunk's copies in flight while the current chunk multiplies), against dense cuBLAS in the
same run, on the Llama layer shapes at decode token counts: the data for keeping one of the two.

    python benchmarks/sweep_decode.py [--shapes 4096x4096,14336x4096] [--tokens 1,2,4,8,16,32] [--dtype float16]

Per token count and buffer count, the split-K is chosen as SparseLinear's autotuner chooses it (ops.search_split);
then that split, the plan's own (split 0) and dense are timed again. Device
time (the host's share hidden, as a CUDA graph runs it), L2 flushed before every call; each output checked
against dense. Writes <out>/<name>.json and .md (bench "decode_xbuf"; backend "dense", "sdsengine:xb1",
"sdsengine:xb2", and "...:own" for the plan's own split). Exits 1 where no CUDA GPU or no extension is there.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from harness import RESULTS, gpu_info, no_gpu, write_results
from sdsengine import ops
from sdsengine.bench import parse_shapes, random_24, rates, table

SHAPES = "4096x4096,11008x4096,4096x11008,1024x4096,14336x4096,4096x14336"  # Llama-2-7B's and Llama-3-8B's


def timed(call, iters):
    return ops.time_ms(call, warmup=3, iters=iters, flush=True, hide_host=True)


def sweep_shape(ext, shape, tokens, dtype, iters):
    values, meta = random_24(shape, dtype, torch.Generator(device="cuda").manual_seed(0))  # L2 is flushed per call
    form = ops.prepare("sdsengine", values, meta)
    dense = ops.prepare("dense", values, meta)
    records = []
    for n in tokens:
        x = torch.randn(n, shape[1], device="cuda", dtype=dtype)
        ref = F.linear(x, dense)
        dense_ms = timed(lambda: F.linear(x, dense), iters)
        base = {"bench": "decode_xbuf", "shape": f"{shape[0]}x{shape[1]}", "tokens": n,
                "dtype": str(dtype).removeprefix("torch."), "gpu": gpu_info()["gpu"], "dense_device_ms": dense_ms}
        records.append(dict(base, backend="dense", device_ms=dense_ms, device_speedup=1.0,
                            **rates(shape, n, dense_ms, sparse=False)))
        locks = ops.stream_locks(form[2], x)
        for x_buffers in (1, 2):
            best = ops.search_split(form, x, None, shape[0], x_buffers)
            for split, label in ((best, ""), (0, ":own")):
                def call(split=split, x_buffers=x_buffers):
                    return ext.spmm24(x, form[0], form[1], shape[0], None, split, locks, x_buffers)
                plan = ext.spmm24_plan(x, shape[0], split, x_buffers)
                ms = timed(call, iters)
                records.append(dict(base, backend=f"sdsengine:xb{x_buffers}{label}", split_k=split,
                                    plan=plan, device_ms=ms, device_speedup=dense_ms / ms,
                                    rel_err=ops.relative_error(call(), ref), **rates(shape, n, ms, sparse=True)))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--tokens", default="1,2,4,8,16,32")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--name", default="decode_xbuf", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    if no_gpu("sweep_decode"):
        return 1
    status = ops.probe("cuda", getattr(torch, args.dtype))["backends"]["sdsengine"]
    if status != "ok":
        print(f"sweep_decode: our kernel is not available here: {status}")
        return 1
    ext = ops.load_extension()
    print(f"sweep_decode on {gpu_info()}")
    records = []
    for shape in shapes:
        rows = sweep_shape(ext, shape, tokens, getattr(torch, args.dtype), args.iters)
        print(table(rows), flush=True)
        records += rows
        path = write_results(args.name, records, args.out)  # after each shape: a run cut short keeps them
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
