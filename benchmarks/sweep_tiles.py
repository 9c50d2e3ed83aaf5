"""Tile and warp settings of the memory-bound kernels (fused Wanda, 2:4 compress), timed against the copy
bandwidth of the same run: the data behind the defaults in kernels/wanda.py and kernels/compress.py.

    python benchmarks/sweep_tiles.py [--shapes 4096x4096,14336x4096] [--dtype float16] [--kernels wanda_0.5,...]
                                     [--json FILE]

Each setting is applied by setting the module's tile constants, timed with L2 flushed before every call,
and its output compared with the defaults' (a tile setting must not change a single bit). GPU only.
"""
import argparse
import itertools
import json
import sys

import torch

import bench_compress
import bench_wanda
import harness
from sdsengine.kernels import compress as compress_mod
from sdsengine.kernels import compress_24, wanda_prune
from sdsengine.kernels import wanda as wanda_mod

SETTINGS = {
    "wanda_2:4": (wanda_mod, {"NM_TILE_ROWS": (8, 16, 32), "NM_TILE_COLS": (128, 256, 512),
                              "NM_WARPS": (4, 8)}),
    "wanda_0.5": (wanda_mod, {"ROW_ELEMS_PER_WARP": (512, 1024, 2048, 4096)}),
    "compress": (compress_mod, {"TILE_ROWS": (8, 16, 32), "TILE_CHUNKS": (2, 4, 8), "WARPS": (4, 8)}),
}


def calls(shape, dtype):
    """Per kernel: (the call, bytes it must move at least)."""
    weight = torch.randn(*shape, dtype=dtype, device="cuda")
    norms = torch.rand(shape[1], device="cuda") + 0.1
    wanda_bytes, compress_bytes = bench_wanda.bytes_moved(weight, norms), bench_compress.bytes_moved(weight)
    return {"wanda_2:4": (lambda: wanda_prune(weight, norms, 0.5, (2, 4)), wanda_bytes),
            "wanda_0.5": (lambda: wanda_prune(weight, norms, 0.5, None), wanda_bytes),
            "compress": (lambda: compress_24(weight), compress_bytes)}


def sweep(name, call, nbytes, copy_gbps):
    module, space = SETTINGS[name]
    defaults = {k: getattr(module, k) for k in space}
    reference = call()
    rows = []
    for values in itertools.product(*space.values()):
        setting = dict(zip(space, values))
        for k, v in setting.items():
            setattr(module, k, v)
        try:
            same = all(torch.equal(a, b) for a, b in zip(call(), reference))
            ms = harness.time_ms(call, 3, 30, flush=True)
            device_ms = harness.time_ms(call, 3, 30, flush=True, hide_host=True)  # a tile changes only this
            rows.append({"kernel": name, **setting, "ms": ms, "device_ms": device_ms, "same_output": same,
                         "frac_copy_bw": harness.bandwidth(nbytes, ms, copy_gbps)["frac_copy_bw"],
                         "device_frac_copy_bw": harness.bandwidth(nbytes, device_ms, copy_gbps)["frac_copy_bw"],
                         "default": setting == defaults})
        except Exception as exc:  # a setting the compiler rejects (registers, shared memory) is reported
            rows.append({"kernel": name, **setting, "error": f"{type(exc).__name__}: {exc}"[:200]})
        finally:
            for k, v in defaults.items():
                setattr(module, k, v)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,14336x4096")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--kernels", type=harness.names_argument(SETTINGS), default=",".join(SETTINGS))
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_tiles: needs a CUDA GPU", file=sys.stderr)
        return 2
    copy_gbps = harness.measure_copy_bandwidth()
    print(f"{harness.gpu_info()}; copy {copy_gbps:.0f} GB/s")
    results = []
    for shape in harness.parse_shapes(args.shapes):
        for name, (call, nbytes) in calls(shape, getattr(torch, args.dtype)).items():
            if name not in args.kernels:
                continue
            rows = sweep(name, call, nbytes, copy_gbps)
            for r in rows:
                r["shape"] = "x".join(map(str, shape))
            results += rows
            ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            default = next((r for r in rows if r.get("default")), {})
            print(f"{name} {shape}: default {default.get('ms', float('nan')):.4f} ms "
                  f"({default.get('frac_copy_bw', float('nan')):.2f} of copy; GPU alone "
                  f"{default.get('device_frac_copy_bw', float('nan')):.2f}); best three:")
            for r in ok[:3]:
                print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
            bad = [r for r in rows if "error" in r or not r.get("same_output", True)]
            for r in bad:
                print("    FAILED", r)
            if args.json:  # after each sweep: a run its time limit ends keeps the sweeps done
                with open(args.json, "w") as f:
                    json.dump({"env": harness.gpu_info(), "copy_gbps": copy_gbps, "records": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
