"""Is the conjugate-gradient refit (SDS's and SparseGPT's --refit N) converged at its default of 50 steps?

For a few decoder layers of the embedded model (Hessians from the dense model's inputs on C4 calibration
windows): SparseGPT's 2:4 mask, its weights refitted by N CG steps for several N, and by an exact
per-row solve on the same mask (v_S = H_SS^-1 (H w)_S in float64). The table gives each linear's relative
output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ); a refit that has converged matches the exact solve.

    python benchmarks/refit_convergence.py [--layers 0,11,23] [--nsamples 16] [--json FILE]
"""
import argparse
import json
import statistics
import sys

import torch

from sds_heldout import dense_hessians, rel_error
from sdsengine.algorithms import sparsegpt
from sdsengine.algorithms.least_squares import Objective, refit
from sdsengine.config import SparseGPTConfig
from sdsengine.models import load_model
from sdsengine.pipeline import adapters

STEPS = (0, 25, 50, 100, 200)


def exact_refit(w, H, keep):
    """Per row, the least-squares weights on the row's kept columns, in float64."""
    Hw, H = w.double() @ H.double(), H.double()
    out = torch.zeros_like(w)
    for i, row in enumerate(keep):
        cols = torch.nonzero(row).squeeze(1)
        out[i, cols] = torch.linalg.solve(H[cols][:, cols], Hw[i, cols]).float()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0,11,23")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model()
    layers = [int(i) for i in args.layers.split(",")]
    modules = dict(adapters.decoder_layers(model).named_modules())
    config = SparseGPTConfig(sparsity="2:4")
    rows = []
    for key, stats in dense_hessians(model, tokenizer, "c4", args.nsamples, layers).items():
        w = adapters.get_weight(modules[key]).detach().float()
        pruned = sparsegpt.obs_prune(w, stats, config).float()
        objective = Objective(w, stats)
        errors = {f"cg {n}": rel_error(w, refit(pruned, objective, n) if n else pruned, stats.H) for n in STEPS}
        errors["exact"] = rel_error(w, exact_refit(w, stats.H, pruned != 0), stats.H)
        rows.append({"linear": key, **errors})
        print(key, " ".join(f"{k}: {e:.5f}" for k, e in errors.items()), flush=True)
    print("\nratio to cg 50, median (min-max) over the linears:")
    for k in rows[0]:
        if k != "linear":
            r = [row[k] / row["cg 50"] for row in rows]
            print(f"  {k:8s} {statistics.median(r):.4f} ({min(r):.4f}-{max(r):.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": layers, "nsamples": args.nsamples, "sparsity": "2:4", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
