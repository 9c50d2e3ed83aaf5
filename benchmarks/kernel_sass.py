"""Static SASS profile of the Triton kernels, compiled for a GPU on any machine (no GPU needed).

Run it with TRITON_INTERPRET unset: under the interpreter the kernels are not compilable functions.

    python benchmarks/kernel_sass.py [--arch 90] [--out benchmarks/results] [--name kernel_sass]

Each kernel is compiled with its default tile settings, specialized as a launch on 16-aligned pointers and
sizes would be, and its SASS counted: instructions per element a thread handles (straight-line kernels
only: a loop's trip count is not in the code), warp shuffles, barriers, shared-memory accesses and the
width of each global access; plus registers per thread and the programs an SM can hold at once, which they
and the shared memory allow. These are static counts, a proxy that shows a kernel's structure (a trip
through shared memory, a reduction across lanes, scalar accesses, an SM left with one program to hide
its latency); they are not a speed. Speed is measured by bench_wanda.py and bench_compress.py on a GPU.
Writes NAME.json (one record per kernel and dtype, with the Triton version) and NAME.md. The GPU suite's
machine may run another Triton than this one, which compiles the same kernel differently: run it with that
version to see what the GPU will run.
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget

from sdsengine.bench import table, write_json
from sdsengine.kernels import compress as compress_mod
from sdsengine.kernels import nm_select as nm_select_mod
from sdsengine.kernels import sparsegpt as sparsegpt_mod
from sdsengine.kernels import wanda as wanda_mod

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
# the unstructured Wanda kernel holds a row padded to a power of two: Llama-7B/8B widths, and 28672 (the
# down projection of 70B-class models), padded past 16384, where a 16-warp program runs out of registers
ROW_LENGTHS = (4096, 11008, 28672)
# per SM, for the occupancy column: 64K registers allocated per warp in steps of 8 per thread; by compute
# capability (the CUDA programming guide's table of limits): shared memory (KiB) usable by programs, each of
# which also reserves 1 KiB, and the most warps and programs resident
SM_LIMITS = {80: (164, 64, 32), 86: (100, 48, 16), 89: (100, 48, 24), 90: (228, 64, 32)}
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)((?:\.[A-Z0-9_]+)*)(.*)")
BACKWARD = re.compile(r"BRA\b.*?0x([0-9a-f]+)")  # a branch's target address


class Kernel(NamedTuple):
    name: str
    fn: object            # the @triton.jit function
    signature: dict       # runtime argument -> Triton type
    constexprs: dict
    warps: int
    elements: int         # elements a program handles
    straight: bool        # no loops: instructions per element mean something
    options: dict = {}    # compile options beyond num_warps, as the launch passes them


def kernels(ty):
    """The Triton kernels as launched on weights of type ty, with their default tiles."""
    wanda_sig = {"W": f"*{ty}", "NORM": "*fp32", "OUT": f"*{ty}", "MASK": "*i8"}
    rows, cols, warps = wanda_mod.NM_TILE_ROWS, wanda_mod.NM_TILE_COLS, wanda_mod.NM_WARPS
    out = [Kernel(f"wanda {n}:{m}", wanda_mod._wanda_nm_kernel, {**wanda_sig, "rows": "i32", "cols": "i32"},
                  {"N": n, "M": m, **wanda_mod.nm_tile(m, BYTES[ty])}, warps, rows * cols, True)
           for n, m in ((2, 4), (4, 8))]
    for length in ROW_LENGTHS:
        block, warps, tie_block = wanda_mod.row_launch(length)
        out.append(Kernel(f"wanda 50% ({length} cols)", wanda_mod._wanda_row_kernel,
                          {**wanda_sig, "cols": "i32", "n_prune": "i32"}, {"BLOCK": block, "TIE_BLOCK": tie_block},
                          warps, block, False))
    tile = {"BLOCK_R": compress_mod.TILE_ROWS, "BLOCK_P": compress_mod.TILE_CHUNKS * 4}  # pairs of groups
    per_program = compress_mod.TILE_ROWS * compress_mod.TILE_CHUNKS * 32
    out.append(Kernel("compress 2:4", compress_mod._compress_kernel,
                      {"W": f"*{ty}", "S": f"*{ty}", "VALUES": f"*{ty}", "META_BYTES": "*u8", "rows": "i32",
                       "cols": "i32"},
                      {"HAS_SCORES": False, **tile}, compress_mod.WARPS, per_program, True))
    out.append(Kernel("decompress 2:4", compress_mod._decompress_kernel,
                      {"VALUES": f"*{ty}", "META_BYTES": "*u8", "OUT": f"*{ty}", "rows": "i32", "cols": "i32"},
                      tile, compress_mod.WARPS, per_program, True))
    return out + [nm_mask_kernel(ty)] + sparsegpt_kernels(ty)


def nm_mask_kernel(ty):
    """The N:M mask kernel on scores of type ty (fp64 too: BESA's learned scores), 2:4, its default tile."""
    return Kernel("nm_mask 2:4", nm_select_mod._nm_mask_kernel,
                  {"S": f"*{ty}", "MASK": "*i8", "rows": "i32", "cols": "i32"},
                  {"N": 2, "M": 4, **wanda_mod.nm_tile(4, BYTES[ty])},
                  wanda_mod.NM_WARPS, wanda_mod.NM_TILE_ROWS * wanda_mod.NM_TILE_COLS, True)


def sparsegpt_kernels(ty, block=128):
    """The SparseGPT block kernel at the default blocksize, N:M and unstructured (the launch passes the output
    Q as the unused KEEP pointer for N:M, and turns FMA contraction off)."""
    rows = sparsegpt_mod.rows_per_program(block)
    out = []
    for name, n, group, keep in (("sparsegpt 2:4", 2, 4, "*fp32"), ("sparsegpt 50%", 0, 1, "*i8")):
        signature = {"W": f"*{ty}", "stride_w": "i32", "HINV": "*fp32", "stride_h": "i32", "KEEP": keep,
                     "Q": "*fp32", "ERR": "*fp32", "LOSS": "*fp32", "rows": "i32", "width": "i32"}
        out.append(Kernel(name, sparsegpt_mod._sparsegpt_block_kernel, signature,
                          {"N": n, "GROUP": group, "NM": bool(n), "BLOCK_R": rows, "BLOCK_B": block}, 4,
                          rows * block, False, {"enable_fp_fusion": False}))
    return out


def compile_sass(kernel, arch):
    """(SASS text, registers per thread, stack bytes per thread, shared bytes per program) of the kernel
    compiled for sm_<arch>, with every runtime argument 16-divisible."""
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(kernel.signature))}
    signature = {**kernel.signature, **{k: "constexpr" for k in kernel.constexprs}}
    source = triton.compiler.ASTSource(fn=kernel.fn, signature=signature, constexprs=kernel.constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": kernel.warps, **kernel.options})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        text = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    # STACK: the thread's frame in local memory; these kernels declare no local arrays, so it holds spills
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return text, int(regs), int(stack), compiled.metadata.shared


def programs_per_sm(regs, shared, warps, arch):
    """How many programs of this kernel an SM holds at once, as its registers, shared memory and warps allow."""
    by_regs = 65536 // (-(-regs // 8) * 8 * 32) // warps
    shared_kib, max_warps, max_programs = SM_LIMITS[arch]
    by_shared = shared_kib * 1024 // (shared + 1024)
    return min(by_regs, by_shared, max_warps // warps, max_programs)


def profile(text, elements_per_thread):
    """Counts from SASS text: per-element instructions (None: a loop's trip count is not in the code), the
    instructions that show the kernel's shape, and for a kernel with loops its first loop's body (one trip:
    the unstructured Wanda kernel's threshold search, SparseGPT's walk over a block's columns)."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3), m.group(4)) for line in text.splitlines()
            if (m := INSTRUCTION.match(line))]
    ops = collections.Counter(op + (suffix if op in ("LDG", "STG") else "") for _, op, suffix, _ in code)
    total = sum(ops.values())
    loop = _first_loop(code)
    return {"instructions": total,
            "per_element": round(total / elements_per_thread, 1) if elements_per_thread else None,
            "shfl": ops["SHFL"], "bar": ops["BAR"], "shared": ops["LDS"] + ops["STS"],
            "global_accesses": ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()) if op.startswith(("LDG", "STG"))),
            "loop_instructions": len(loop) if loop else None,
            "loop_bar": sum(op == "BAR" for op in loop) if loop else None,
            "loop_shfl": sum(op == "SHFL" for op in loop) if loop else None}


def _first_loop(code):
    """The opcodes from the first backward branch's target to that branch, or None (straight-line code)."""
    for address, op, _, operands in code:
        if op == "BRA" and (target := BACKWARD.search(op + operands)) and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            return [o for a, o, _, _ in code if start <= a <= address]
    return None


def run(arch):
    records = []
    for dtype, ty in {**DTYPES, "float64": "fp64"}.items():
        for k in kernels(ty) if ty != "fp64" else [nm_mask_kernel(ty)]:  # only nm_mask takes fp64
            text, regs, stack, shared = compile_sass(k, arch)
            stats = profile(text, k.elements / (32 * k.warps) if k.straight else None)
            records.append({"bench": "kernel_sass", "kernel": k.name, "dtype": dtype, "arch": f"sm_{arch}",
                            "triton": triton.__version__, "warps": k.warps, "elements_per_program": k.elements,
                            **stats, "regs": regs, "stack_bytes": stack,
                            "programs_per_sm": programs_per_sm(regs, shared, k.warps, arch)})
    return records


COLUMNS = ("kernel", "dtype", "arch", "warps", "elements_per_program", "per_element", "shfl", "bar", "shared",
           "loop_instructions", "loop_bar", "loop_shfl", "regs", "stack_bytes", "programs_per_sm", "global_accesses")


def markdown(records):
    return (f"Static SASS counts per thread, Triton {triton.__version__}, compiled without a GPU "
            "(`python benchmarks/kernel_sass.py`): a proxy for a kernel's structure, not a speed. per_element: "
            "instructions / elements per thread (- for a kernel with loops); shared: LDS + STS; loop_*: one trip "
            "of the first loop, where there is one (instructions, barriers, shuffles); regs: registers per "
            "thread; stack_bytes: a thread's stack frame in local memory (register spills); programs_per_sm: programs an SM holds at "
            "once.\n\n" + table(records, COLUMNS) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability as an integer")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="kernel_sass", help="results file stem (NAME.json, NAME.md)")
    args = parser.parse_args()
    records = run(args.arch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{args.name}.json", records)
    (out / f"{args.name}.md").write_text(markdown(records))
    print(markdown(records))


if __name__ == "__main__":
    main()
