"""Hardware counters (Nsight Compute) of the kernels that miss their targets, one call of each, so that the next
change aims at what limits them (bandwidth, occupancy, stalls) instead of guessing from times alone.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats \\
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \\
        python benchmarks/ncu_kernels.py > ncu_kernels.csv
    python benchmarks/ncu_kernels.py --summarize ncu_kernels.csv [--out benchmarks/results] [--name ncu]

The first form (the GPU suite's optional step `ncu`) warms every call up, so that compiles, tuning and
allocations stay outside what ncu profiles, then makes each call once between cudaProfilerStart and Stop: fused
Wanda 2:4 (4096x11008) and 50% per row (4096x4096), 2:4 compress (4096x11008, 4096x4096), a copy of the
4096x11008 weight (what the Triton kernels' targets are measured against), and, where the extension is built,
our 2:4 decode kernel against dense at 1 and 16 tokens on 14336x4096 and 4096x14336; fp16. The calls' labels go
to stderr in order: its stdout is ncu's CSV. ncu's clocks are left as the card has them (--clock-control none).
The second form turns the CSV (ncu's own lines before its header skipped) into one record per kernel launch: its
name, grid and block, duration, DRAM and memory throughput as % of peak, occupancy, registers, cycles per issued
instruction and ncu's own advice lines, in <name>.json and <name>.md. The first form needs a CUDA GPU.
"""
import argparse
import csv
import io
import sys

import torch

from harness import RESULTS, no_gpu, table, write_results

# ncu's details-page metric names -> the record's fields
METRICS = {"Duration": "duration", "DRAM Throughput": "dram_pct", "Memory Throughput": "memory_pct",
           "Compute (SM) Throughput": "sm_pct", "Achieved Occupancy": "achieved_occupancy_pct",
           "Theoretical Occupancy": "theoretical_occupancy_pct", "Registers Per Thread": "registers",
           "Warp Cycles Per Issued Instruction": "cycles_per_issue", "L2 Hit Rate": "l2_hit_pct"}
COLUMNS = ("id", "kernel", "grid", "block", "duration", "duration_unit", "dram_pct", "memory_pct", "sm_pct",
           "achieved_occupancy_pct", "theoretical_occupancy_pct", "registers", "cycles_per_issue", "l2_hit_pct")


def calls():
    """[(label, call)]: what ncu profiles, in order."""
    from sdsengine import ops
    from sdsengine.kernels import compress_24, wanda_prune
    from sdsengine.masks import nm_mask
    g = torch.Generator(device="cuda").manual_seed(0)
    wide = torch.randn(4096, 11008, device="cuda", dtype=torch.float16, generator=g)
    square = torch.randn(4096, 4096, device="cuda", dtype=torch.float16, generator=g)
    norms_wide, norms_square = torch.rand(11008, device="cuda") + 0.1, torch.rand(4096, device="cuda") + 0.1
    out = [("wanda 2:4 4096x11008", lambda: wanda_prune(wide, norms_wide, 0.5, (2, 4))),
           ("wanda 50% 4096x4096", lambda: wanda_prune(square, norms_square, 0.5, None)),
           ("compress 4096x11008", lambda: compress_24(wide)),
           ("compress 4096x4096", lambda: compress_24(square)),
           ("copy 4096x11008", lambda: wide.clone())]
    if ops._why_not("sdsengine", torch.device("cuda"), torch.float16) is None:
        for rows, cols in ((14336, 4096), (4096, 14336)):
            weight = torch.randn(rows, cols, device="cuda", dtype=torch.float16, generator=g)
            weight *= nm_mask(weight.abs(), 2, 4)
            form = ops.prepare("sdsengine", *compress_24(weight))
            for tokens in (1, 16):
                x = torch.randn(tokens, cols, device="cuda", dtype=torch.float16, generator=g)
                ours = lambda f=form, x=x, r=rows: ops.run("sdsengine", f, x, None, r)  # noqa: E731
                dense = lambda w=weight, x=x: torch.nn.functional.linear(x, w)  # noqa: E731
                out += [(f"ours {rows}x{cols} x {tokens}", ours), (f"dense {rows}x{cols} x {tokens}", dense)]
    return out


def profile():
    """Each call warmed up, then once inside the profiled range."""
    todo = calls()
    for _, call in todo:
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for label, call in todo:
        print(f"ncu_kernels: {label}", file=sys.stderr, flush=True)
        call()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def parse(text):
    """One record per kernel launch from ncu's `--csv --page details` output (its own lines before the header
    skipped); metrics ncu did not report are absent."""
    start = text.find('"ID",')
    if start < 0:
        raise ValueError("no ncu CSV header (a line starting with \"ID\",) in the input")
    records = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        if not row.get("Kernel Name"):
            continue
        record = records.setdefault(row["ID"], {"id": int(row["ID"]), "kernel": row["Kernel Name"],
                                                "grid": row.get("Grid Size"), "block": row.get("Block Size")})
        field = METRICS.get(row.get("Metric Name"))
        if field:
            record[field] = _number(row.get("Metric Value"))
            if field == "duration":
                record["duration_unit"] = row.get("Metric Unit")
        advice = (row.get("Rule Description") or "").strip()
        if advice and row.get("Rule Type") in ("OPT", "WRN"):
            record.setdefault("advice", []).append(advice[:300])
    return sorted(records.values(), key=lambda r: r["id"])


def _number(text):
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return text


def summarize(path, out, name):
    records = parse(open(path, encoding="utf-8", errors="replace").read())
    print(table(records, COLUMNS))
    return write_results(name, records, out, COLUMNS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", metavar="CSV", help="turn ncu's CSV into records instead of profiling")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--name", default="ncu", help="results file stem")
    args = parser.parse_args(argv)
    if args.summarize:
        print(f"wrote {summarize(args.summarize, args.out, args.name)}")
        return 0
    if no_gpu("ncu_kernels"):
        return 1
    profile()
    return 0


if __name__ == "__main__":
    sys.exit(main())
