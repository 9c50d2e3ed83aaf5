"""What loading a model costs, each load in a fresh process: a compressed checkpoint (written by `sdsengine
convert`) with sdsengine.load_compressed, against the pruned model it came from with transformers'
from_pretrained in the same dtype, the baseline, in the same run.

    python benchmarks/bench_load.py --model PACKED --dense PRUNED [--repeats 3]

Per side, the median over the repeats of the load's seconds and of its peak memory (the process's RSS
high-water mark during the load, above the RSS before it; both after the imports, which both sides share),
and the RSS the loaded model holds once every tensor has been read (load_compressed's tensors map the file
and are read in on first use, so its load time leaves out most of the file's reading, which
from_pretrained's includes). Writes benchmarks/results/<name>.json and .md: one record, bench "load",
ms against baseline_ms and their ratio as speedup, peak_mib against baseline_peak_mib.
"""
import argparse
import json
import statistics
import subprocess
import sys

from harness import RESULTS, gpu_info, write_results

# Run in a child: the imports first, then the load between two reads of /proc/self/status.
CHILD = r"""
import json, sys, time, torch
import sdsengine
from sdsengine.transformers_compat import dtype_kwargs
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

def mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

side, path, dtype = sys.argv[1:]
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]  # the model's module, imported untimed
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts from here
start_rss, start = mib("VmRSS"), time.perf_counter()
if side == "compressed":
    model = sdsengine.load_compressed(path)
else:
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(getattr(torch, dtype))).eval()
seconds = time.perf_counter() - start
peak = mib("VmHWM") - start_rss
with torch.no_grad():
    for t in (*model.parameters(), *model.buffers()):
        t.sum()  # reads every page, allocating nothing of the tensor's size
print(json.dumps({"s": seconds, "peak_mib": peak, "held_mib": mib("VmRSS") - start_rss,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}))
"""


def load_once(side, path, dtype):
    """One load in a fresh interpreter: {s, peak_mib, held_mib, dtype}."""
    done = subprocess.run([sys.executable, "-c", CHILD, side, path, dtype], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"loading {path} ({side}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_load(side, path, dtype, repeats):
    runs = [load_once(side, path, dtype) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in ("s", "peak_mib", "held_mib")} | {
        "dtype": runs[0]["dtype"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a compressed checkpoint directory (sdsengine convert)")
    parser.add_argument("--dense", required=True, help="the pruned HF checkpoint it was converted from")
    parser.add_argument("--repeats", type=int, default=3, help="loads per side (median)")
    parser.add_argument("--name", default="load", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    packed = median_load("compressed", args.model, "", args.repeats)
    dense = median_load("dense", args.dense, packed["dtype"], args.repeats)  # the same dtype: a fair baseline
    if dense["dtype"] != packed["dtype"]:
        raise RuntimeError(f"the baseline loaded in {dense['dtype']}, not in the checkpoint's {packed['dtype']}")
    record = {"bench": "load", "model": args.model, "baseline_model": args.dense, "dtype": packed["dtype"],
              "gpu": gpu_info()["gpu"], "repeats": args.repeats,
              "ms": packed["s"] * 1e3, "baseline_ms": dense["s"] * 1e3, "speedup": dense["s"] / packed["s"],
              "peak_mib": packed["peak_mib"], "baseline_peak_mib": dense["peak_mib"],
              "held_mib": packed["held_mib"], "baseline_held_mib": dense["held_mib"]}
    print(f"load ({record['dtype']}): compressed {packed['s']:.2f} s, peak +{packed['peak_mib']:.0f} MiB, holds "
          f"{packed['held_mib']:.0f} MiB; dense from_pretrained {dense['s']:.2f} s, peak +{dense['peak_mib']:.0f} "
          f"MiB, holds {dense['held_mib']:.0f} MiB")
    print(f"wrote {write_results(args.name, [record], args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
