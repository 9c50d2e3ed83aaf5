"""SparseLinear's host cost per call against nn.Linear's, on shapes too small for the GEMM to matter.

Each layer is called in a loop and timed with the host clock (the device synchronized after the loop),
nn.Linear's and SparseLinear's loops in turn, so what is measured is Python, dispatch and launch: the cost a
converted model pays on every linear in eager mode. A converted Llama runs 7 linears per decoder layer, so at
32 layers and X microseconds more per call, an eager prefill or decode step costs 224 X more host time; it
shows wherever the step is host-bound.
Runs on the CPU too (there the only backend is dense, reached by the same dispatch as on a GPU).

A layer timed alone shows less than a model pays: in a model each call's Python runs among the rest of the
forward's, with colder caches (on the CPU, 4 us more per call alone against 11 in an 8-layer model, 12-04). So
each token count is also timed through a whole small Llama (8 decoder layers of width 256, 56 linears pruned
2:4, shape `llama-tiny/8layers`), dense and converted, a forward at a time; its `extra_us` is per linear call.

    python benchmarks/bench_dispatch.py [--tokens 1,512] [--calls 2000]

Writes benchmarks/results/dispatch[-cpu].json and .md: per token count and shape, `ms` (SparseLinear, or the
converted model) and `dense_ms` (nn.Linear, or the dense model) per call, `extra_us` = the difference in
microseconds (per linear call), and `speedup` = dense_ms / ms.
"""
import argparse
import copy
import statistics
import warnings
import sys
import time

import torch
from torch import nn

from harness import RESULTS, gpu_info, tokens_argument, write_results
from sdsengine.masks import nm_mask
from sdsengine.nn import SparseLinear, convert, sparse_linear

SHAPE = (64, 256)  # (out, in): a GEMM of a few microseconds, so the host side is what is timed
MODEL_LAYERS, MODEL_WIDTH = 8, 256  # the small Llama: its forward is host-bound on any device


def per_call_ms(dense, sparse, x, calls, repeats=7):
    """(dense's, sparse's) median over `repeats` of the mean host time of `calls` calls in a row, the two timed in
    turn: timed one after the other, the second model's figure took whatever the host drifted to meanwhile (on
    the CPU, 512 tokens through the small Llama: +51 to +264 us per linear call in three runs one after the
    other, +3.7 in turn)."""
    times = {dense: [], sparse: []}
    with torch.no_grad():
        for layer in times:
            for _ in range(20):
                layer(x)  # tunes SparseLinear and warms every cache
        for _ in range(repeats):
            for layer, seen in times.items():
                _sync(x.device)
                start = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                _sync(x.device)
                seen.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times[dense]), statistics.median(times[sparse])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def layers(device, dtype):
    torch.manual_seed(0)
    dense = nn.Linear(SHAPE[1], SHAPE[0], bias=False).to(device, dtype)
    with torch.no_grad():
        dense.weight.mul_(nm_mask(dense.weight.abs(), 2, 4))
    return dense, SparseLinear.from_linear(dense)


def measure(tokens, device, dtype, calls):
    dense, sparse = layers(device, dtype)
    x = torch.randn(1, tokens, SHAPE[1], device=device, dtype=dtype)
    dense_ms, ms = per_call_ms(dense, sparse, x, calls)
    backend = sparse_linear.autotune_choices().get(sparse._key(tokens), "?")
    return _record(f"{SHAPE[0]}x{SHAPE[1]}", tokens, dtype, ms, dense_ms, backend=backend)


def _record(shape, tokens, dtype, ms, dense_ms, **fields):
    """One record; extra_us is per linear call (a model's forward makes fields["linears"] of them)."""
    per_call = (ms - dense_ms) * 1e3 / fields.get("linears", 1)
    return dict(bench="dispatch", shape=shape, tokens=tokens, dtype=str(dtype).removeprefix("torch."),
                gpu=gpu_info()["gpu"], **fields, ms=ms, dense_ms=dense_ms, extra_us=per_call, speedup=dense_ms / ms)


def small_llamas(device, dtype):
    """(dense, converted, linears): the same small Llama, every decoder linear pruned 2:4, and their number."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=MODEL_WIDTH, intermediate_size=2 * MODEL_WIDTH, num_hidden_layers=MODEL_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    dense = AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
    linears = [m for m in dense.model.layers.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in linears:
            m.weight.mul_(nm_mask(m.weight.abs(), 2, 4))
    with warnings.catch_warnings():  # on the CPU, float32: "always the dense fallback", as measured here
        warnings.simplefilter("ignore")
        converted = convert(copy.deepcopy(dense))
    return dense, converted, len(linears)


def measure_model(tokens, device, dtype, calls):
    dense, converted, linears = small_llamas(device, dtype)
    ids = torch.randint(0, 1000, (1, tokens), device=device)
    dense_ms, ms = per_call_ms(dense, converted, ids, calls)
    return _record(f"llama-tiny/{MODEL_LAYERS}layers", tokens, dtype, ms, dense_ms, linears=linears)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=tokens_argument, default="1,512", help="token counts, comma-separated")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed loop")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--name", default=None, help="results file stem (default dispatch, or dispatch-cpu)")
    args = parser.parse_args(argv)
    tokens = args.tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    records = [measure(n, device, dtype, args.calls) for n in tokens]
    # a forward makes 56 linear calls: a loop of calls / 20 forwards takes about as long as the layer's
    records += [measure_model(n, device, dtype, max(1, args.calls // 20)) for n in tokens]
    for r in records:
        print(f"{r['tokens']:>5} tokens, {r['shape']} on {r['gpu']}: SparseLinear {r['ms'] * 1e3:.2f} us, dense "
              f"{r['dense_ms'] * 1e3:.2f} us per call ({r['extra_us']:+.2f} us per linear call)")
    name = args.name or ("dispatch" if device.type == "cuda" else "dispatch-cpu")
    print(f"wrote {write_results(name, records, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
