"""The short summary of a benchmark run: per benchmark and group, the key ratios (median [min, max]) and how
many records met their target; then every suite step, record and target that failed or was skipped.

    python benchmarks/summarize.py [--dir benchmarks/results] [--steps benchmarks/results/suite_steps.tsv]

Reads <dir>/<bench>.json for wanda, sparsegpt, compress, spmm, wgmma_tiles, wgmma_tma, e2e, dispatch, spmm_bf16,
decode_xbuf, e2e_full, grouped, e2e_moe, methods, spmm_sweep and e2e_compiled (lists of records; see README.md), the
step table gpu_suite.sh writes (and, after a SUITE_STEPS re-run, suite_steps_earlier.tsv: how the other steps ended
when they last ran), and the test steps' skips (<step>_skips.tsv: a test step whose tests skipped still exits 0). A
record whose output disagrees with its reference (mismatch > 0, rel_err > REL_ERR_MAX) counts as failed, its timing
left out of the ratios. Standard library only, so it still reports when the install failed.
"""
import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

BENCHES = ("wanda", "sparsegpt", "compress", "nm_mask", "spmm", "wgmma_tiles", "wgmma_tma", "e2e", "dispatch",
           "spmm_bf16", "decode_xbuf", "e2e_full", "grouped", "e2e_moe", "methods", "spmm_sweep", "e2e_compiled")
GROUP_BY = {"spmm": ("backend", "dtype"), "spmm_bf16": ("backend", "dtype"), "spmm_sweep": ("backend", "dtype"),
            "decode_xbuf": ("backend", "dtype"),
            "e2e": ("bench", "backend", "dtype", "batch"),
            "e2e_full": ("bench", "backend", "dtype", "batch"), "e2e_moe": ("bench", "backend", "dtype", "batch"),
            "e2e_compiled": ("bench", "backend", "dtype", "batch"),
            "wgmma_tiles": ("backend", "tokens"), "wgmma_tma": ("backend", "tokens"),
            "dispatch": ("shape", "tokens", "dtype"), "grouped": ("layers", "dtype"),
            "methods": ("method", "pattern")}  # default: pattern, dtype
# device_speedup: spmm's against dense in the GPU's own time; ms/device_ms > 1: the call waited on its host side;
# weight x dense: e2e's linear weights as the converted model holds them (all chosen forms) against dense's;
# all-rows tile x: grouped's kernel with its token tile sized for every token against the default (> 1: default faster);
# s/layer and GPU GiB, not ratios: a pruning method's seconds per decoder layer and peak GPU memory (methods)
RATIOS = ("speedup", "device_speedup", "frac_copy_bw", "vs_copy", "ms/device_ms", "weight x dense", "all-rows tile x",
          "s/layer", "GPU GiB")
MAX_LISTED = 25
REL_ERR_MAX = 2e-2  # against dense (spmm, wgmma) or the PyTorch reference (sparsegpt): ops.MATCHES_DENSE
TEST_STEPS = ("kernel_tests", "gpu_tests")
SKIPS_BY_DESIGN = (  # a backend this GPU cannot have; a CPU-only check that a GPU run leaves to the GPU tests
    "PyTorch's CUTLASS 2:4 kernel needs compute capability 8.x",
    "needs compute capability 9.0 (wgmma.sp is sm_90a code)",
    "the wgmma.sp kernel runs on compute capability 9.0 only",
    "on a GPU the GPU tests check the pipelines themselves",
)


class Unreadable(Exception):
    """A results file that is no list of records (cut short, emptied, hand-edited)."""


def load(path):
    """The records of one results file ([] if absent); older files held {"env": ..., "records": [...]}."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        records = data["records"] if isinstance(data, dict) else data
    except (ValueError, KeyError, TypeError) as exc:
        raise Unreadable(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise Unreadable("not a list of records")
    return records


def _by_design(reason):
    return any(expected in reason for expected in SKIPS_BY_DESIGN)


def _wrong(record):
    """A record timed on output that disagrees with its reference: the timing of a broken kernel."""
    return bool(record.get("mismatch")) or (record.get("rel_err") or 0) > REL_ERR_MAX


def groups(name, records):
    """One summary row per group of a bench's measured records."""
    keys = GROUP_BY.get(name, ("pattern", "dtype"))
    grouped = {}
    for r in records:
        if r.get("status", "ok") == "ok" and not _wrong(r):
            grouped.setdefault(" ".join(str(r.get(k)) for k in keys), []).append(r)
    return [_row(name, group, rows) for group, rows in grouped.items()]


def _ratio(record, name):
    if name == "ms/device_ms":
        return record["ms"] / record["device_ms"] if record.get("device_ms") and record.get("ms") else None
    if name == "weight x dense":
        held, dense = record.get("weight_mib"), record.get("dense_weight_mib")
        return held / dense if held and dense else None
    if name == "all-rows tile x":
        all_rows, default = record.get("tiles_for_all_rows_device_ms"), record.get("device_ms")
        return all_rows / default if all_rows and default else None
    if name in ("s/layer", "GPU GiB"):
        return record.get({"s/layer": "seconds_per_layer", "GPU GiB": "gpu_peak_allocated_gib"}[name])
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
    """'cuda-graph' or 'eager' of an e2e mode, without the reason a capture failed (which may differ by side), after
    'compiled (backend)' where bench_e2e --compile ran the steps through torch.compile."""
    if mode is None:
        return None
    compiled, _, rest = str(mode).partition(", ") if str(mode).startswith("compiled (") else ("", "", str(mode))
    return " ".join(filter(None, (compiled, rest.split(" ")[0])))


def problems(name, records):
    """(lines for records that failed or were skipped, lines for records that missed their target)."""
    failed, missed = [], []
    for r in records:
        what = r.get("method", r.get("dtype"))  # a pruning method's record names no dtype
        where = f"{name} {r.get('shape')} {what} {r.get('pattern', r.get('backend', ''))}"
        where += f" x {r['tokens']} tokens" if "tokens" in r else ""
        if r.get("status") == "skipped" and _by_design(r.get("error", "")):
            continue
        if r.get("status", "ok") != "ok":
            failed.append(f"{where}: {r['status']} ({r.get('error', '')})")
        elif _wrong(r):
            failed.append(f"{where}: output differs from its reference (mismatch {r.get('mismatch')}, rel_err "
                          f"{r.get('rel_err')}): not counted")
        elif _kind(r.get("mode")) != _kind(r.get("dense_mode")):  # e2e decode: a capture failed on one side only
            failed.append(f"{where}: timed {r.get('mode')} against dense {r.get('dense_mode')}: its speedup "
                          "compares unlike runs")
        elif r.get("target_met") is False:
            ratios = ", ".join(f"{k} {_ratio(r, k):.3g}" for k in RATIOS if _ratio(r, k) is not None)
            missed.append(f"{where}: target missed ({r.get('target')}; {ratios})")
    return failed, missed


def step_rows(path):
    """The rows of a step table (step, status, rc, seconds; tab-separated), or None without one."""
    if not path or not Path(path).exists():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def steps_run(path):
    """The step names of the step table, or None without one."""
    rows = step_rows(path)
    return None if rows is None else {r["step"] for r in rows}


def step_problems(path, when=""):
    """Lines for suite steps that did not end ok."""
    return [f"step {r['step']}{when}: {r['status']} (rc {r['rc']}, {r['seconds']} s)"
            for r in step_rows(path) or [] if r["status"] != "ok"]


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
            if not _by_design(reason):
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
    directory = Path(args.dir)
    steps = args.steps or directory / "suite_steps.tsv"
    earlier = Path(steps).parent / "suite_steps_earlier.tsv"
    ran = steps_run(steps)
    rows, issues = collect(directory, ran)
    if rows:
        print_rows(rows)
    older = [n for n in BENCHES if ran is not None and n not in ran and (directory / f"{n}.json").exists()]
    if older:  # a SUITE_STEPS re-run keeps the other steps' files: say which figures are not from this run
        ended = {r["step"]: r["status"] for r in step_rows(earlier) or []}
        print("\nfrom an earlier run (not a step of this one): "
              + ", ".join(f"{n} ({ended[n]})" if n in ended else n for n in older))
    issues = (step_problems(steps) + step_problems(earlier, " (an earlier run)") + skip_problems(directory, ran)
              + issues)
    print(f"\n{len(issues)} failed, skipped or missed:" if issues else "\nnothing failed, skipped or missed")
    for line in issues[:MAX_LISTED]:
        print(f"  {line}")
    if len(issues) > MAX_LISTED:
        print(f"  ... and {len(issues) - MAX_LISTED} more")
    return 0


def collect(directory, ran=None):
    """(summary rows, problem lines) over every bench's results: failures before target misses, so that they
    survive the cut at MAX_LISTED. ran: the steps of this run (None: all), the only ones missed if absent."""
    rows, failures, misses = [], [], []
    for name in BENCHES:
        try:
            records = load(directory / f"{name}.json")
        except Unreadable as exc:
            failures.append(f"{name}: unreadable results ({exc})")
            continue
        rows += groups(name, records)
        failed, missed = problems(name, records)
        failures += failed if records or (ran is not None and name not in ran) else [f"{name}: no results"]
        misses += missed
    return rows, failures + misses

if __name__ == "__main__":
    sys.exit(main())
