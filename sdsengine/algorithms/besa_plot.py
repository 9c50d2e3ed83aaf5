"""Show what BESA learned: the per-row sparsity allocation stored in a run's sdsengine.json.

    python -m sdsengine.algorithms.besa_plot RUN/sdsengine.json [--svg allocation.svg]

prints one line per layer and linear (mean/min/max row sparsity and a text histogram) and, with --svg,
writes a dependency-free SVG: one strip per layer, one column per linear, each row's sparsity as a
shade (white = dense, black = pruned). matplotlib is not needed.
"""
import argparse
import base64
import json
import sys

import numpy as np

BARS = " ▁▂▃▄▅▆▇█"


def row_sparsity(info) -> np.ndarray:
    """The per-row sparsity of one linear from its report entry (row_zeros_b64 / in_features)."""
    dtype = np.dtype(info["row_zeros_dtype"]).newbyteorder("<")
    zeros = np.frombuffer(base64.b64decode(info["row_zeros_b64"]), dtype=dtype)
    return zeros.astype(np.float64) / info["in_features"]


def allocations(report) -> list[tuple[int, str, np.ndarray]]:
    """(layer index, linear name, per-row sparsity) for every linear that BESA reported."""
    out = []
    for layer in report["layers"]:
        for name, info in (layer.get("steps") or {}).items():
            if isinstance(info, dict) and "row_zeros_b64" in info:
                out.append((layer["index"], name, row_sparsity(info)))
    return out


def text_report(report, bins=20) -> str:
    recipe = report["recipe"].get("base_recipe", report["recipe"])  # SDS over BESA: BESA's settings
    lines = [f"BESA allocation, {recipe.get('mode', '?')} mode, target {report['recipe']['sparsity']}",
             f"{'layer':>5}  {'linear':<20} {'mean':>6} {'min':>6} {'max':>6}  histogram of row sparsity 0..1"]
    for index, name, s in allocations(report):
        hist = np.histogram(s, bins=bins, range=(0, 1))[0]
        bars = "".join(BARS[int(np.ceil(8 * h / max(hist.max(), 1)))] for h in hist)
        lines.append(f"{index:5d}  {name:<20} {s.mean():6.3f} {s.min():6.3f} {s.max():6.3f}  |{bars}|")
    return "\n".join(lines)


def svg(report, cell=2, strip=48) -> str:
    """One strip per layer (height `strip` px), one column per linear; rows resampled to the strip."""
    items = allocations(report)
    names = list(dict.fromkeys(name for _, name, _ in items))
    layers = sorted({index for index, _, _ in items})
    width, height = 120 + len(names) * 60, 30 + len(layers) * (strip + 4)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="9">']
    parts += [f'<text x="{120 + i * 60}" y="12">{n.split(".")[-1]}</text>' for i, n in enumerate(names)]
    for index, name, s in items:
        y0 = 20 + layers.index(index) * (strip + 4)
        parts.append(f'<text x="2" y="{y0 + strip // 2}">layer {index}</text>')
        resampled = np.interp(np.linspace(0, len(s) - 1, strip // cell), np.arange(len(s)), s)
        for k, v in enumerate(resampled):
            shade = int(255 * (1 - v))
            parts.append(f'<rect x="{120 + names.index(name) * 60}" y="{y0 + k * cell}" width="50" '
                         f'height="{cell}" fill="rgb({shade},{shade},{shade})"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="sdsengine.json of a --method besa run")
    parser.add_argument("--svg", default=None, help="also write the allocation as an SVG image")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    if not allocations(report):
        recipe = report["recipe"].get("base_recipe", report["recipe"])
        why = ("a BESA N:M run learns a selection, not an allocation" if recipe.get("method") == "besa"
               else f"the run is {report['recipe'].get('method', '?')}, not BESA")
        print(f"no BESA row allocation in this report: {why}", file=sys.stderr)
        return 1
    print(text_report(report))
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
