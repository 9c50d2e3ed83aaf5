"""Tile widths of the Hopper wgmma.sp kernel (csrc/spmm24_sm90*.cu) against dense cuBLAS in the same run, on
the Llama layer shapes at prefill token counts, per pipeline: the data behind spmm24_sm90_plan's choice of
tile_n (the backends wgmma, wgmma_overlap, wgmma_tma and wgmma_tma_multicast run the plan's own choice).

    python benchmarks/sweep_wgmma.py [--shapes 4096x4096,14336x4096] [--tokens 256,512,2048,4096] \
        [--pipelines plain,overlap,tma,tma_multicast]

Every tile width is checked against dense (relative error) before it is timed; L2 is flushed before every
call. Writes <out>/<name>.json and .md (bench "wgmma_tiles", backend "wgmma:tn<width>" or "wgmma:auto(...)",
"+<pipeline>" for a pipeline other than plain). The GPU suite sweeps the TMA pipelines in a run of their
own (wgmma_tma), so that one that traps on its first hardware run leaves the others' figures intact.
Needs compute capability 9.0 and an extension built with sm_90a code; says so and exits 0 otherwise.
"""
import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from harness import RESULTS, gpu_info, no_gpu, write_results
from sdsengine import ops
from sdsengine.bench import parse_shapes, random_24_weights, rates, table

TILES = (0, 64, 128, 256)  # 0: the plan's own choice
BACKEND_OF = {pipeline: backend for backend, pipeline in ops.WGMMA_PIPELINES.items()}  # csrc/spmm24.h says
PIPELINES = tuple(BACKEND_OF)  # what each does


def sweep_shape(ext, shape, tokens, dtype, iters, pipelines):
    values, meta = random_24_weights(shape, dtype)[0]
    values_r, meta_r = ops.prepare("sdsengine", values, meta)[:2]
    dense = ops.prepare("dense", values, meta)
    records = []
    for n in tokens:
        x = torch.randn(n, shape[1], device="cuda", dtype=dtype)
        ref = F.linear(x, dense)
        dense_ms = ops.time_ms(lambda: F.linear(x, dense), iters=iters)
        base = {"bench": "wgmma_tiles", "shape": f"{shape[0]}x{shape[1]}", "tokens": n,
                "dtype": str(dtype).removeprefix("torch."), "gpu": torch.cuda.get_device_name(),
                "dense_ms": dense_ms}
        records.append(dict(base, backend="dense", ms=dense_ms, speedup=1.0, rel_err=0.0,
                            **rates(shape, n, dense_ms, sparse=False)))
        for tile_n, pipeline in itertools.product(TILES, pipelines):
            call = lambda: ext.spmm24_sm90(x, values_r, meta_r, shape[0], None, tile_n, pipeline)  # noqa: E731
            err = ops.relative_error(call(), ref)
            ms = ops.time_ms(call, iters=iters)
            chosen = ext.spmm24_sm90_plan(x, shape[0], tile_n, pipeline)["tile_n"]
            label = ((f"wgmma:tn{tile_n}" if tile_n else f"wgmma:auto(tn{chosen})")
                     + ("" if pipeline == "plain" else f"+{pipeline}"))
            records.append(dict(base, backend=label, ms=ms, speedup=dense_ms / ms, rel_err=err,
                                **rates(shape, n, ms, sparse=True)))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336")
    parser.add_argument("--tokens", default="256,512,1024,2048,4096")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--name", default="wgmma_tiles", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    pipelines = [p for p in args.pipelines.split(",") if p]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        parser.error(f"unknown pipelines {unknown}; expected some of {', '.join(PIPELINES)}")
    if no_gpu("sweep_wgmma"):
        return 1
    if torch.cuda.get_device_capability() != (9, 0):  # by design: the kernel is sm_90a code
        print("sweep_wgmma: needs a GPU of compute capability 9.0; nothing measured")
        write_results(args.name, [{"bench": "wgmma", "gpu": gpu_info()["gpu"], "status": "skipped",
                                   "error": "needs compute capability 9.0 (wgmma.sp is sm_90a code)"}], args.out)
        return 0
    status = ops.probe("cuda", getattr(torch, args.dtype))["backends"]  # each pipeline's child self-check
    for pipeline in [p for p in pipelines if status[BACKEND_OF[p]] != "ok"]:
        print(f"sweep_wgmma: not timing the {pipeline} pipeline: {status[BACKEND_OF[pipeline]]}")
        pipelines.remove(pipeline)
    if not pipelines:
        return 0
    ext = ops.load_extension()
    records = []
    for shape in parse_shapes(args.shapes):
        records += sweep_shape(ext, shape, tokens, getattr(torch, args.dtype), args.iters, pipelines)
        print(table(records[-len(tokens) * (len(TILES) * len(pipelines) + 1):]), flush=True)
        path = write_results(args.name, records, args.out)  # after each shape: a run cut short keeps them
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
