"""The short summary of a benchmark run: per benchmark and group, the key ratios (median [min, max]) and how
many records met their target; then every suite step, record and target that failed or was skipped.

    python benchmarks/summarize.py [--dir benchmarks/results] [--steps benchmarks/results/suite_steps.tsv]

Reads <dir>/<bench>.json for wanda, sparsegpt, compress, spmm, wgmma_tiles, wgmma_tma, e2e, dispatch,
spmm_bf16 and e2e_full (lists of records; see README.md), the step table gpu_suite.sh writes, and the test
steps' skips (<step>_skips.tsv: a test step whose tests skipped still exits 0). Standard library only, so it
still reports when the install failed.
"""
import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

BENCHES = ("wanda", "sparsegpt", "compress", "spmm", "wgmma_tiles", "wgmma_tma", "e2e", "dispatch", "spmm_bf16",
           "e2e_full")
GROUP_BY = {"spmm": ("backend", "dtype"), "spmm_bf16": ("backend", "dtype"), "e2e": ("bench", "backend", "dtype"),
            "e2e_full": ("bench", "backend", "dtype"),
            "wgmma_tiles": ("backend", "tokens"), "wgmma_tma": ("backend", "tokens"),
            "dispatch": ("tokens", "dtype")}  # default: pattern, dtype
# device_speedup: spmm's against dense in the GPU's own time; ms/device_ms > 1: the call waited on its host side;
# weight x dense: e2e's linear weights as the converted model holds them (all chosen forms) against dense's
RATIOS = ("speedup", "device_speedup", "frac_copy_bw", "vs_copy", "ms/device_ms", "weight x dense")
MAX_LISTED = 25
TEST_STEPS = ("kernel_tests", "gpu_tests")
SKIPS_BY_DESIGN = (  # a backend this GPU cannot have; a CPU-only check that a GPU run leaves to the GPU tests
    "PyTorch's CUTLASS 2:4 kernel needs compute capability 8.x",
    "needs compute capability 9.0 (wgmma.sp is sm_90a code)",
    "the wgmma.sp kernel runs on compute capability 9.0 only",
    "on a GPU the GPU tests check the pipelines themselves",
)


def load(path):
    """The records of one results file ([] if absent); older files held {"env": ..., "records": [...]}."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data["records"] if isinstance(data, dict) else data


def groups(name, records):
    """One summary row per group of a bench's measured records."""
    keys = GROUP_BY.get(name, ("pattern", "dtype"))
    grouped = {}
    for r in records:
        if r.get("status", "ok") == "ok":
            grouped.setdefault(" ".join(str(r.get(k)) for k in keys), []).append(r)
    return [_row(name, group, rows) for group, rows in grouped.items()]


def _ratio(record, name):
    if name == "ms/device_ms":
        return record["ms"] / record["device_ms"] if record.get("device_ms") and record.get("ms") else None
    if name == "weight x dense":
        held, dense = record.get("weight_mib"), record.get("dense_weight_mib")
        return held / dense if held and dense else None
    return record.get(name)


def _row(name, group, rows):
    row = {"bench": name, "group": group, "n": str(len(rows))}
    for ratio in RATIOS:
        values = [v for v in (_ratio(r, ratio) for r in rows) if v is not None]
        row[ratio] = f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]" if values else ""
    judged = [r["target_met"] for r in rows if r.get("target_met") is not None]
    row["targets met"] = f"{sum(judged)}/{len(judged)}" if judged else ""
    return row


def _kind(mode):
    """'cuda-graph' or 'eager' of an e2e mode, without the reason a capture failed (which may differ by side)."""
    return None if mode is None else str(mode).split(" ")[0]


def problems(name, records):
    """(lines for records that failed or were skipped, lines for records that missed their target)."""
    failed, missed = [], []
    for r in records:
        where = f"{name} {r.get('shape')} {r.get('dtype')} {r.get('pattern', r.get('backend', ''))}"
        if r.get("status", "ok") != "ok":
            failed.append(f"{where}: {r['status']} ({r.get('error', '')})")
        elif _kind(r.get("mode")) != _kind(r.get("dense_mode")):  # e2e decode: a capture failed on one side only
            failed.append(f"{where}: timed {r.get('mode')} against dense {r.get('dense_mode')}: its speedup "
                          "compares unlike runs")
        elif r.get("target_met") is False:
            ratios = ", ".join(f"{k} {_ratio(r, k):.3g}" for k in RATIOS if _ratio(r, k) is not None)
            missed.append(f"{where}: target missed ({r.get('target')}; {ratios})")
    return failed, missed


def steps_run(path):
    """The step names of the step table, or None without one."""
    if not path or not Path(path).exists():
        return None
    with open(path, newline="") as f:
        return {r["step"] for r in csv.DictReader(f, delimiter="\t")}


def step_problems(path):
    """Lines for suite steps that did not end ok (the file: step, status, rc, seconds; tab-separated)."""
    if not path or not Path(path).exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [f"step {r['step']}: {r['status']} (rc {r['rc']}, {r['seconds']} s)" for r in rows if r["status"] != "ok"]


def skip_problems(directory, ran=None):
    """Lines for the test steps' skips that are not by design, one per kind of reason (numbers and shapes
    folded), with how many tests skipped for it."""
    lines = []
    for step in TEST_STEPS:
        path = directory / f"{step}_skips.tsv"
        if not path.exists() or (ran is not None and step not in ran):
            continue
        kinds = {}
        for line in path.read_text().splitlines():
            reason = line.partition("\t")[2]
            if not any(expected in reason for expected in SKIPS_BY_DESIGN):
                kind = re.sub(r"\d+", "#", reason)[:100]
                kinds[kind] = kinds.get(kind, 0) + 1
        lines += [f"step {step}: {n} test(s) skipped: {kind}" for kind, n in sorted(kinds.items(), key=lambda k: -k[1])]
    return lines


def print_rows(rows):
    cols = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    for line in [dict(zip(cols, cols)), *rows]:
        print("  ".join(line[c].ljust(w) for c, w in zip(cols, widths)).rstrip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--steps", default=None, help="the step table of gpu_suite.sh (default <dir>/suite_steps.tsv)")
    args = parser.parse_args(argv)
    rows, issues = collect(Path(args.dir))
    if rows:
        print_rows(rows)
    steps = args.steps or Path(args.dir) / "suite_steps.tsv"
    ran = steps_run(steps)
    older = [n for n in BENCHES if ran is not None and n not in ran and (Path(args.dir) / f"{n}.json").exists()]
    if older:  # a SUITE_STEPS re-run keeps the other steps' files: say which figures are not from this run
        print(f"\nfrom an earlier run (not a step of this one): {', '.join(older)}")
    issues = step_problems(steps) + skip_problems(Path(args.dir), ran) + issues
    print(f"\n{len(issues)} failed, skipped or missed:" if issues else "\nnothing failed, skipped or missed")
    for line in issues[:MAX_LISTED]:
        print(f"  {line}")
    if len(issues) > MAX_LISTED:
        print(f"  ... and {len(issues) - MAX_LISTED} more")
    return 0


def collect(directory):
    """(summary rows, problem lines) over every bench's results: failures before target misses, so that they
    survive the cut at MAX_LISTED."""
    rows, failures, misses = [], [], []
    for name in BENCHES:
        records = load(directory / f"{name}.json")
        rows += groups(name, records)
        failed, missed = problems(name, records)
        failures += failed if records else [f"{name}: no results"]
        misses += missed
    return rows, failures + misses

if __name__ == "__main__":
    sys.exit(main())
