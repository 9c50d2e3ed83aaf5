"""Where does a pruned model drift away from the dense one? Per-layer hidden-state error on held-out text.

For each pruned model (a saved run directory), on WikiText-2 *validation* windows (the test split stays
untouched): the relative squared error ||h_pruned - h_dense||² / ||h_dense||² of the residual stream after
every decoder layer; the same after RMS-normalizing each token's state (what the next layer's norm passes on:
a few tokens of large norm dominate the first and count no more than the others in the second); and the mean
KL(dense || pruned) of the next-token distributions. Unlike the layer report's `error` (one layer, both fed
the pruned stream), this is the accumulated drift the perplexity sees.

    python benchmarks/drift.py runs/sparsegpt_2-4 runs/sds-sparsegpt_2-4 [--model M] [--windows 4] [--json FILE]

--model is the dense model the runs were pruned from (default: the embedded SmolLM2-135M).
"""
import argparse
import json
from pathlib import Path

import torch

from sdsengine.config import CalibrationConfig
from sdsengine.data import calibration_samples
from sdsengine.models import load_model
from sdsengine.pipeline import adapters


@torch.no_grad()
def states(model, window):
    """(the residual stream after each decoder layer, log-probabilities) for one window. Read from the layers
    themselves: transformers' hidden_states ends with the final norm's output in place of the last layer's."""
    after = []
    hooks = [layer.register_forward_hook(lambda m, args, out: after.append(adapters.layer_output(out).float()))
             for layer in adapters.decoder_layers(model)]
    try:
        logits = model(window).logits
    finally:
        for hook in hooks:
            hook.remove()
    return after, torch.log_softmax(logits.float(), dim=-1)


def rms_normalized(h):
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def drift(dense, pruned, windows):
    """{"layers": [relative error after layer i], "normalized": [the same per token after RMS normalization,
    averaged over tokens], "kl": mean KL(dense || pruned) per token}."""
    err = ref = normed = 0
    kl, tokens = 0.0, 0
    for window in windows:
        hd, ld = states(dense, window.unsqueeze(0))
        hp, lp = states(pruned, window.unsqueeze(0))
        err = err + torch.tensor([float((a - b).pow(2).sum()) for a, b in zip(hp, hd)])
        ref = ref + torch.tensor([float(b.pow(2).sum()) for b in hd])
        # a normalized state has mean square 1, so its mean squared error is already relative
        normed = normed + torch.tensor([float((rms_normalized(a) - rms_normalized(b)).pow(2).mean(dim=-1).sum())
                                        for a, b in zip(hp, hd)])
        kl += float((ld.exp() * (ld - lp)).sum())
        tokens += window.numel()
    return {"layers": (err / ref).tolist(), "normalized": (normed / tokens).tolist(), "kl": kl / tokens}


def table(results):
    """Each cell: relative error / RMS-normalized error."""
    names = list(results)
    lines = ["| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(len(results[names[0]]["layers"])):
        cells = (f"{results[n]['layers'][i]:.4f} / {results[n]['normalized'][i]:.4f}" for n in names)
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines.append("| KL/token | " + " | ".join(f"{results[n]['kl']:.4f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="saved pruned-model directories")
    parser.add_argument("--model", help="the dense model they were pruned from: hub id, HF directory or .gguf file "
                                        "(default: the embedded SmolLM2-135M)")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 validation windows of 2048 tokens")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (Path(run) / "config.json").is_file():
            raise SystemExit(f"{run} is not a saved model directory (no config.json)")
    if len({Path(run).name for run in args.runs}) < len(args.runs):  # results are keyed by the folder's name
        raise SystemExit(f"two runs share a folder name ({' '.join(args.runs)}): their results would collide")
    dense, tokenizer, _ = load_model(args.model)
    count = len(adapters.decoder_layers(dense))
    windows = calibration_samples(tokenizer, CalibrationConfig("wikitext2", nsamples=args.windows, seqlen=2048, seed=0))
    results = {}
    for run in args.runs:
        pruned, _, _ = load_model(run)
        layers = len(adapters.decoder_layers(pruned))
        if layers != count:  # pruned from another model than --model
            raise SystemExit(f"{run} has {layers} decoder layers and the dense model {count}: "
                             "pass the model it was pruned from as --model")
        results[Path(run).name] = drift(dense, pruned, windows)
        del pruned
    print(table(results))
    if args.json:
        record = {"model": args.model, "windows": args.windows, "results": results}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
