"""What `sdsengine prune --stream-weights` and `sdsengine convert --stream-weights` save in host memory: the same prune
with the model loaded whole (the baseline) and streamed from its files a layer at a time (sdsengine/pipeline/
streaming.py), then the same convert of the pruned checkpoint loaded whole and streamed a linear at a time
(sdsengine/nn/convert_streamed.py), each in a fresh process, in the same run, and whether the two checkpoints are
equal, tensor by tensor; then the same evaluation (perplexity and zero-shot) of the pruned checkpoint loaded whole and
streamed a decoder layer at a time (sdsengine/eval/streamed.py).

    python benchmarks/bench_streaming.py [--model DIR | --shape llama2-7b] [--layers 4] [--methods wanda] \
        [--dtype float32] [--sparsity 2:4] [--nsamples 8] [--seqlen 512] [--eval-windows 8] [--device cpu] \
        [--name streaming_cpu]

Without --model, a checkpoint of random weights with --layers decoder layers of --shape's (speed and memory do not
depend on the values) is written to a scratch folder: Llama-2-7B's (hidden 4096, MLP 11008, 32 heads), or
Qwen3-30B-A3B's (qwen3-moe: hidden 2048, 128 experts of 768, 8 per token, 32 query and 4 key-value heads; saved as
transformers saves it, each expert's projections apart, which transformers 5 fuses on load); its vocabulary is the
embedded SmolLM2's (49152), whose tokenizer builds the calibration windows. Writes benchmarks/results/<name>.json and
.md: per method and mode ("whole", "streamed") a record of bench "streaming" with the command's peak RSS (VmHWM at its
end: the load, the prune and the save), the prune's own (`prune_peak_rss_gib`, the report's: the save not yet made),
the prune's seconds (the report's), the whole command's wall seconds, the model's weights in GiB, the largest layer's,
and `identical` (every tensor of the streamed checkpoint equal to the baseline's, names and dtypes too); then per
method and mode a record of bench "streaming_convert" for the convert of the loaded prune's checkpoint (its peak RSS,
wall seconds, `identical`; dtype the converted model's: bfloat16 from a float32 checkpoint); then per mode a record
of bench "streaming_eval" for `sdsengine eval --tasks wikitext2,piqa --seqlen <seqlen> --limit <eval-windows>` of that
checkpoint (peak RSS, wall seconds, the perplexity, PIQA's accuracy, and `identical`: the two results equal).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import prune_arguments, prune_flags, write_results
from safetensors import safe_open

COLUMNS = ("bench", "method", "mode", "dtype", "weights_gib", "largest_layer_gib", "cpu_peak_rss_gib",
           "prune_peak_rss_gib", "rss_saved_gib", "seconds", "wall_seconds", "identical", "ppl", "piqa_acc")


SHAPES = {"llama2-7b": "Llama-2-7B", "qwen3-moe": "Qwen3-30B-A3B"}


def random_checkpoint(directory, shape, layers, dtype):
    """A checkpoint of `layers` layers of `shape` (a key of SHAPES) with random weights, and SmolLM2's tokenizer, in
    directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    from sdsengine.models import load_model
    if shape == "qwen3-moe":
        config = Qwen3MoeConfig(vocab_size=49152, hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32,
                                num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)
    else:
        config = LlamaConfig(vocab_size=49152, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # made in its dtype: a float32 copy of a mixture is GiBs more
    try:
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    finally:
        torch.set_default_dtype(default)
    _, tokenizer, _ = load_model(None)
    tokenizer.save_pretrained(directory)
    return directory


def prune(args, model, method, out, streamed):
    """(the run report, the command's peak RSS in GiB, its wall seconds) of one prune in a fresh process."""
    peak, wall = measured(prune_flags(args, method, out) + ["--model", model, "--dtype", args.dtype], streamed)
    return json.loads((Path(out) / "sdsengine.json").read_text()), peak, wall


def measured(flags, streamed):
    """(peak RSS in GiB, wall seconds) of the sdsengine command `flags` (with --stream-weights where `streamed`) in a
    fresh process."""
    code = ("import json, sys; from sdsengine.cli import main; from sdsengine.report import peak_memory; "
            "rc = main(sys.argv[1:]); print(json.dumps(peak_memory('cpu'))); sys.exit(rc)")
    flags = flags + (["--stream-weights"] if streamed else [])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code] + flags, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])["cpu_peak_rss_gib"], time.perf_counter() - start


def identical(a, b):
    """Whether checkpoints a and b hold the same tensors (names, dtypes, values), read one tensor at a time."""
    def index(directory):
        found = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        return found
    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in ia:
        with safe_open(ia[name], "pt") as fa, safe_open(ib[name], "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                return False
    return True


def sizes(model, dtype):
    """(the weights, the largest decoder layer) in GiB, in dtype, from the checkpoint's headers of shapes."""
    from sdsengine.pipeline.streaming import checkpoint_files, headers
    element = torch.finfo(getattr(torch, dtype)).bits // 8
    per_layer, total = {}, 0
    for name, stored in headers(checkpoint_files(model)).items():
        count = torch.Size(stored.shape).numel() * element
        total += count
        if ".layers." in name:
            index = name.split(".layers.")[1].split(".")[0]
            per_layer[index] = per_layer.get(index, 0) + count
    return total / 2**30, max(per_layer.values(), default=0) / 2**30


def converts(args, pruned, method, weights, largest):
    """The records of the checkpoint `pruned` converted loaded whole and streamed."""
    runs = {mode: measured(["convert", "--model", pruned, "--out", f"{pruned}-{mode}-compressed"], mode == "streamed")
            for mode in ("whole", "streamed")}
    same = identical(f"{pruned}-whole-compressed", f"{pruned}-streamed-compressed")
    dtype = json.loads((Path(f"{pruned}-whole-compressed") / "sdsengine_compressed.json").read_text())["dtype"]
    records = []
    for mode, (peak, wall) in runs.items():
        records.append({"bench": "streaming_convert", "method": method, "mode": mode, "dtype": dtype,
                        "pattern": args.sparsity, "weights_gib": weights, "largest_layer_gib": largest,
                        "cpu_peak_rss_gib": peak, "rss_saved_gib": round(runs["whole"][0] - peak, 3),
                        "wall_seconds": round(wall, 1), "identical": same,
                        "model": f"the {method} {args.sparsity} checkpoint above (loaded whole)"})
        print(f"convert {mode}: peak RSS {peak:.2f} GiB, {wall:.1f} s wall; identical: {same}")
    return records


def evaluates(args, pruned, method, weights, largest):
    """The records of the checkpoint `pruned` evaluated (WikiText-2 perplexity, PIQA) loaded whole and streamed."""
    runs, results = {}, {}
    for mode in ("whole", "streamed"):
        out = f"{pruned}-{mode}-eval.json"
        runs[mode] = measured(["eval", "--model", pruned, "--tasks", "wikitext2,piqa", "--seqlen", str(args.seqlen),
                               "--limit", str(args.eval_windows), "--dtype", args.dtype, "--json", out],
                              mode == "streamed")
        results[mode] = json.loads(Path(out).read_text())["results"]
    same = results["whole"] == results["streamed"]
    records = []
    for mode, (peak, wall) in runs.items():
        records.append({"bench": "streaming_eval", "method": method, "mode": mode, "dtype": args.dtype,
                        "pattern": args.sparsity, "weights_gib": weights, "largest_layer_gib": largest,
                        "cpu_peak_rss_gib": peak, "rss_saved_gib": round(runs["whole"][0] - peak, 3),
                        "wall_seconds": round(wall, 1), "identical": same, "ppl": results[mode]["wikitext2"]["ppl"],
                        "piqa_acc": results[mode]["piqa"]["acc"], "protocol": _protocol(results[mode]),
                        "model": f"the {method} {args.sparsity} checkpoint above (loaded whole)"})
        print(f"eval {mode}: peak RSS {peak:.2f} GiB, {wall:.1f} s wall, ppl {results[mode]['wikitext2']['ppl']}, "
              f"piqa acc {results[mode]['piqa']['acc']}; identical: {same}")
    return records


def _protocol(results):
    ppl = results["wikitext2"]
    return f"wikitext2 test, {ppl['windows']} x {ppl['seqlen']}; piqa validation, first {results['piqa']['n']} items"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a safetensors checkpoint directory (default: random weights)")
    parser.add_argument("--shape", default="llama2-7b", choices=SHAPES, help="the random checkpoint's layer shapes")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random checkpoint")
    prune_arguments(parser, ["wanda"], 8, "streaming_cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--eval-windows", type=int, default=8,
                        help="WikiText-2 windows of --seqlen, and PIQA items, evaluated")
    args = parser.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as scratch:
        model = args.model or str(random_checkpoint(Path(scratch) / "model", args.shape, args.layers, args.dtype))
        weights, largest = sizes(model, args.dtype)
        for method in args.methods:
            runs = {mode: prune(args, model, method, f"{scratch}/{method}-{mode}", mode == "streamed")
                    for mode in ("whole", "streamed")}
            same = identical(f"{scratch}/{method}-whole", f"{scratch}/{method}-streamed")
            for mode, (report, peak, wall) in runs.items():
                records.append({"bench": "streaming", "method": method, "mode": mode, "dtype": args.dtype,
                                "pattern": args.sparsity, "device": args.device, "weights_gib": weights,
                                "largest_layer_gib": largest, "cpu_peak_rss_gib": peak,
                                "prune_peak_rss_gib": report["memory"]["cpu_peak_rss_gib"],
                                "rss_saved_gib": round(runs["whole"][1] - peak, 3),
                                "seconds": report["seconds"], "wall_seconds": round(wall, 1), "identical": same,
                                "calibration": f"{args.calib} {args.nsamples} x {args.seqlen}, seed 0",
                                "model": args.model or f"random {SHAPES[args.shape]}-shaped, {args.layers} layers",
                                "versions": report["versions"]})
                print(f"{method} {args.sparsity} {mode}: peak RSS {peak:.2f} GiB (the prune's "
                      f"{report['memory']['cpu_peak_rss_gib']:.2f}), {report['seconds']:.1f} s prune, "
                      f"{wall:.1f} s wall; identical: {same}")
            records += converts(args, f"{scratch}/{method}-whole", method, weights, largest)
            records += evaluates(args, f"{scratch}/{method}-whole", method, weights, largest)
    print(f"wrote {write_results(args.name, records, args.out, COLUMNS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
