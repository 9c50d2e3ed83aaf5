"""Does a pruning step that lowers a linear's calibration error also lower its error on held-out text?

For a few decoder layers of a model (--model; default the embedded one): H_cal from C4 calibration windows
and H_val from WikiText-2 *validation* windows (the test split stays untouched), both from the dense model's
inputs.
Each variant prunes with H_cal only; the table gives its relative output error
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) under H_cal and under H_val, as a ratio to SparseGPT's. A variant that lowers
the first and raises the second fits the calibration set, not the layer.

    python benchmarks/sds_heldout.py [--model M] [--layers 0,7,15,23] [--nsamples 16] [--json FILE]
"""
import argparse
import json
import statistics
import sys
from dataclasses import replace

import torch

from sdsengine.algorithms import sds, sparsegpt, wanda
from sdsengine.algorithms.stats import Hessian
from sdsengine.config import CalibrationConfig, SDSConfig
from sdsengine.data import calibration_samples
from sdsengine.models import load_model
from sdsengine.pipeline import adapters
from sdsengine.pipeline.capture import capture_layer_inputs
from sdsengine.pipeline.sequential import collect_stats

REFERENCES = {"sparsegpt": sparsegpt.obs_prune, "wanda": wanda.prune}  # the base pruners alone; ratios are to SparseGPT's
# Each variant names every flag whose default has changed, so that a name means one run whatever today's
# defaults are. The records were made under older defaults, and name a variant as it was called then:
# sds_heldout.json's "sds default" is "sds refit 0" here (before --refit existed); sds_heldout_swaps*.json's
# "sds default" is "sds refit 50", and their "sparsegpt refit 50" / "sparsegpt refit swaps 1" (--base
# sparsegpt) are "base refit 50" / "base refit swaps 1".
PAPER = {"refit": 0, "swaps": 0}  # the paper's three steps
VARIANTS = {  # name -> SDSConfig changes
    "sds today": {},  # today's defaults, whatever they are
    "sds refit 0": PAPER,
    "sds no adjust": {**PAPER, "adjust": "off"},
    "sds iters 50": {**PAPER, "iters": 50},
    "sds anchor 0.01": {**PAPER, "anchor": 0.01},
    "sds anchor 0.1": {**PAPER, "anchor": 0.1},
    "sds anchor 1": {**PAPER, "anchor": 1.0},
    "sds refit 50": {"refit": 50, "swaps": 0},
    "sds swaps 1": {"refit": 50, "swaps": 1},
    "base refit 50": {"iters": 0, "refit": 50, "swaps": 0},  # the --base pruner's mask, refitted
    "base refit swaps 1": {"iters": 0, "refit": 50, "swaps": 1},
}


def hessians(model, windows, layers):
    """{"layer.linear": Hessian} for the chosen layers, from the dense model's inputs, through the
    pipeline's own capture and layer replay (so any supported family works)."""
    inps, kwargs = capture_layer_inputs(model, windows, "cpu", "cpu")
    outs = torch.empty_like(inps)
    stats = {}
    for i, layer in enumerate(adapters.decoder_layers(model)[:max(layers) + 1]):
        targets = adapters.linear_modules(layer) if i in layers else {}
        mine = {name: Hessian(adapters.get_weight(m).shape[1], "cpu") for name, m in targets.items()}
        collect_stats(layer, targets, mine, inps, outs, kwargs[i], "cpu")
        stats.update({f"{i}.{name}": h for name, h in mine.items()})
        inps, outs = outs, inps
    return stats


def dense_hessians(model, tokenizer, source, nsamples, layers):
    """hessians() on `nsamples` windows of 2048 tokens from `source` (seed 0)."""
    windows = calibration_samples(tokenizer, CalibrationConfig(source, nsamples=nsamples, seqlen=2048, seed=0))
    return hessians(model, windows, layers)


def rel_error(w, v, H):
    d = (v - w).double()
    return float(((d @ H.double()) * d).sum() / ((w.double() @ H.double()) * w.double()).sum())


def variant_configs(parser, base, names=None):
    """{name: its SDSConfig} for the named variants (comma-separated), or for every variant that applies to
    the pattern (the swaps are N:M only); a named variant that does not apply is refused by name."""
    configs = {}
    for name in names.split(",") if names else VARIANTS:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        try:
            configs[name] = replace(base, **VARIANTS[name])
        except ValueError as exc:
            if names:
                parser.error(f"variant {name!r}: {exc}")
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id, HF directory or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--layers", default="0,7,15,23")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--base", default="sparsegpt", help="SDS's base pruner (the ratios stay against SparseGPT)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    base = SDSConfig(sparsity=args.sparsity, base=args.base)
    configs = variant_configs(parser, base, args.variants)  # before the Hessians (minutes)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.model)
    layers = [int(i) for i in args.layers.split(",")]
    count = len(adapters.decoder_layers(model))
    if max(layers) >= count:
        parser.error(f"--layers {args.layers}: the model has decoder layers 0 to {count - 1}")
    H_cal = dense_hessians(model, tokenizer, "c4", args.nsamples, layers)
    H_val = dense_hessians(model, tokenizer, "wikitext2", args.nsamples, layers)
    variants = {**dict.fromkeys(REFERENCES), **configs}
    modules = dict(adapters.decoder_layers(model).named_modules())
    rows = []
    for key, stats in H_cal.items():
        w = adapters.get_weight(modules[key]).detach().float()
        results = {}
        for variant, config in variants.items():
            if config is None:
                v = REFERENCES[variant](w, stats, base)
            else:
                v, _ = sds.prune(w, stats, config)
            results[variant] = (rel_error(w, v, stats.H), rel_error(w, v, H_val[key].H))
        ref_cal, ref_val = results["sparsegpt"]
        rows.append({"linear": key, **{f"{k} cal": c / ref_cal for k, (c, _) in results.items()},
                     **{f"{k} val": v / ref_val for k, (_, v) in results.items()},
                     "sparsegpt cal abs": ref_cal, "sparsegpt val abs": ref_val})
        print(key, " ".join(f"{k}: {c / ref_cal:.3f}/{v / ref_val:.3f}" for k, (c, v) in results.items()), flush=True)
    print("\nmean ratio to SparseGPT (calibration C4 / held-out WikiText-2 validation):")
    for variant in variants:
        cal_mean = statistics.mean(r[f"{variant} cal"] for r in rows)
        val_mean = statistics.mean(r[f"{variant} val"] for r in rows)
        print(f"  {variant:20s} {cal_mean:.3f} / {val_mean:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            recipes = {name: config.to_dict() for name, config in configs.items()}
            json.dump({"model": args.model, "layers": layers, "nsamples": args.nsamples, "sparsity": args.sparsity,
                       "base": args.base, "recipes": recipes, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
