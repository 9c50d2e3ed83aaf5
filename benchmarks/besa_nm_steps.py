"""BESA's N:M learner on one decoder layer: the hard-mask block loss along learning, per step size.

The layer sees dense inputs (the calibration windows run through the dense layers before it), learns one
step per window as `--method besa --sparsity 2:4` does, and at steps 8, 16, 32, ... reports the hard-mask
block loss on the first --eval-windows windows over that of Wanda's N:M start. A step size may carry a
schedule: 0.05:cos decays it to 0 by the last step (cosine).

    python benchmarks/besa_nm_steps.py --layer 0 0.05 0.05:cos 0.00625 [--json FILE]
"""
import argparse
import json
import math
import time

import torch

from sdsengine.algorithms import besa, besa_block, besa_nm
from sdsengine.config import BESAConfig, CalibrationConfig
from sdsengine.data import calibration_samples
from sdsengine.models import load_model
from sdsengine.pipeline import adapters
from sdsengine.pipeline import sequential as seq
from sdsengine.pipeline.capture import capture_layer_inputs


def layer_context(model, samples, layer_index):
    """The LayerContext BESA sees for this layer, with dense inputs (every earlier layer left dense)."""
    device = torch.device("cpu")
    inps, kwargs = capture_layer_inputs(model, samples, device, device)
    layers = adapters.decoder_layers(model)
    outs = torch.empty_like(inps)
    for i, layer in enumerate(layers[:layer_index]):
        seq.run_layer(layer, inps, outs, kwargs[i], device)
        inps, outs = outs, inps
    layer = layers[layer_index]
    targets = seq._targets(model, layer, layer_index, [])
    stats = seq._new_stats(besa, targets, device)
    seq.collect_stats(layer, targets, stats, inps, outs, kwargs[layer_index], device)
    return seq.LayerContext(layer, targets, stats, inps, outs, kwargs[layer_index], device)


def curve(ctx, spec, sparsity, eval_windows):
    """[(step, hard loss / start)] at steps 8, 16, 32, ... for one step size (and schedule)."""
    lr, _, schedule = spec.partition(":")
    config = BESAConfig(sparsity=sparsity, lr=float(lr))
    energy = besa_block.channel_energy(ctx.outs, ctx.device)

    @torch.no_grad()
    def hard_loss(weights):
        return sum(float(besa_block.block_loss(ctx, weights, j, ctx.outs, energy)) for j in range(eval_windows)) / eval_windows

    learner = besa_nm.SelectionLearner(ctx, config)
    start = hard_loss({name: weight for name, (weight, _) in learner.start().items()})
    optimizer = besa_block.make_optimizer(learner.parameters(), config, config.lr)
    steps, points = ctx.inps.shape[0], []
    with torch.enable_grad():
        for j in range(steps):
            if schedule == "cos":
                for group in optimizer.param_groups:
                    group["lr"] = float(lr) * 0.5 * (1 + math.cos(math.pi * j / steps))
            loss = besa_block.block_loss(ctx, learner.masked_weights("ste"), j, ctx.outs, energy)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if j + 1 >= 8 and (j + 1) & j == 0:
                points.append((j + 1, hard_loss(learner.masked_weights("hard")) / start))
    return start, points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("specs", nargs="+", help="step sizes, each optionally with :cos")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows = learning steps")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--json", help="write the curves here")
    args = parser.parse_args(argv)
    model, tokenizer, _ = load_model()
    samples = calibration_samples(tokenizer, CalibrationConfig("c4", nsamples=args.nsamples, seqlen=2048, seed=0))
    ctx = layer_context(model, samples, args.layer)
    eval_windows = min(args.eval_windows, args.nsamples)
    records = []
    for spec in args.specs:
        t = time.perf_counter()
        start, points = curve(ctx, spec, args.sparsity, eval_windows)
        records.append({"layer": args.layer, "lr": spec, "sparsity": args.sparsity, "nsamples": args.nsamples,
                        "eval_windows": eval_windows, "start_loss": start, "loss_over_start": points,
                        "seconds": round(time.perf_counter() - t)})
        print(f"layer {args.layer} lr {spec}: start {start:.5f}; hard loss / start by step "
              + ", ".join(f"{s}: {r:.4f}" for s, r in points), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
