"""Which empty slots should SDS's refit fill? Where the adjustment keeps W2 and the re-dense's L1 zeroed
some of W2's kept weights, the refit's support needs that many more slots (sds.refit_support).

On synthetic layers (correlated inputs, Wanda's mask, a fraction of its kept weights zeroed): the refit's
relative error when the empty slots are ranked by the one-weight gain g²/(2 H_jj), over its error when they
are filled by position (lowest index first), per seed.

    python benchmarks/refit_support.py [--zeroed 0.2] [--seeds 5] [--json FILE]
"""
import argparse
import json

import torch

from sdsengine.algorithms import sds
from sdsengine.algorithms.least_squares import Objective, refit
from sdsengine.algorithms.stats import Hessian
from sdsengine.config import SDSConfig


def layer(seed, out=64, inp=128, tokens=1024, mixing=0.3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    stats = Hessian(inp, "cpu")
    stats.add_batch(torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + mixing * torch.randn(inp, inp, generator=g)))
    return w, stats, g


def ratio(sparsity, seed, zeroed):
    w, stats, g = layer(seed)
    config = SDSConfig(base="wanda", sparsity=sparsity)
    objective = Objective(w, stats)
    w1 = sds.BASES["wanda"](w, stats, config)
    project = sds._projector(w1 != 0, config)
    w2 = w1 * (torch.rand(w1.shape, generator=g) >= zeroed)
    by_position = refit(w2, objective, config.refit, support=project(w2.abs()))
    by_benefit = refit(w2, objective, config.refit, support=sds.refit_support(w2, objective, project))
    return objective.error(by_benefit) / objective.error(by_position)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zeroed", type=float, default=0.2, help="fraction of W2's kept weights zeroed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", help="also write the ratios here")
    args = parser.parse_args()
    rows = {}
    for sparsity in ("0.5", "2:4", "4:8"):
        rows[sparsity] = [ratio(sparsity, seed, args.zeroed) for seed in range(args.seeds)]
        print(f"{sparsity:>4}: benefit / position = " + ", ".join(f"{r:.3f}" for r in rows[sparsity]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"zeroed": args.zeroed, "seeds": args.seeds, "benefit_over_position": rows}, f, indent=1)


if __name__ == "__main__":
    main()
