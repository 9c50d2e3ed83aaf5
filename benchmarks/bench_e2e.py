"""End-to-end prefill and decode tokens/s of a Llama-shaped model (or a mixture of experts: Mixtral-8x7B,
Qwen3-30B-A3B) with random weights pruned 2:4 (magnitude): dense vs the same model after sdsengine.nn.convert, in
one run. A mixture's dense experts run as transformers runs them by default (grouped_mm), its converted ones one
expert at a time through SparseLinear; the routing reads the token counts on the host, so its steps are not
captured as CUDA graphs (the record's mode says so).

Prefill: one forward over --prefill tokens (only the last position's logits). Decode: --steps single-token
steps against a static KV cache, replayed as a CUDA graph (the eager fallback is reported as such: Python
overhead then hides kernel time). The layer count is cut to fit GPU memory, and the output says so. --compile:
the decode steps of both models through torch.compile first (inductor fuses what lies between the linears), then
replayed as CUDA graphs, as a user's compiled model runs (SparseLinear's kernels run as one opaque op there).

Prefill is also timed as a CUDA-graph replay (no host overhead), the converted model again with every
SparseLinear forced onto the dense backend, and last both models once more, the dense one first (a copy
kept for that), so that one run tells a host-bound gap, SparseLinear's own overhead and drift between
measurements (the converted model is first timed right after its tuning) apart; they go into the
e2e_prefill record as graph_ms / dense_graph_ms, forced_dense_ms, dense_ms_after and ms_after. Last, both
models are timed in turn, eager and as graphs, five rounds each (in_turn_ms, graph_in_turn_ms and their dense_
twins), so that drift falls on both alike. The record's ms and dense_ms are each model's lower eager timing of
the two (first_ms, dense_first_ms: the first ones).

    python benchmarks/bench_e2e.py [--model llama-3-8b|llama-2-7b|mixtral-8x7b|qwen3-30b-a3b] [--layers 32]
                                   [--dtype float16] [--compile] [--decode-batches 16]

Writes benchmarks/results/<name>.json (a list of records) and .md; exits with a message where no CUDA GPU is visible.
"""
import argparse
import copy
import functools
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from harness import RESULTS, gpu_info, no_gpu, require_transformers, time_ms, tokens_argument, write_results
from sdsengine.masks import nm_mask
from sdsengine.nn import convert, set_graphs, sparse_linear, weight_bytes
from sdsengine.pipeline import adapters, experts

CONFIGS = {  # transformers model type (llama unless named) and config; mixtures keep their experts fused
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000, num_hidden_layers=32),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, num_hidden_layers=32, rope_theta=500000.0),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, num_hidden_layers=32, num_local_experts=8,
                         num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          num_hidden_layers=48, num_experts=128, num_experts_per_tok=8),
}


def model_config(name, layers, max_len):
    from transformers import AutoConfig
    settings = dict(CONFIGS[name], num_hidden_layers=layers, max_position_embeddings=max_len)
    return AutoConfig.for_model(settings.pop("model_type", "llama"), **settings)


def build_model(name, layers, dtype, max_len, device="cuda"):
    """A random model of the named shape on the device, pruned 2:4 by magnitude (prune_24)."""
    from transformers import AutoModelForCausalLM
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name, layers, max_len), dtype=dtype).eval()
    return prune_24(model)


@torch.no_grad()
def prune_24(model):
    """Every decoder linear but a mixture's routers, and every expert of its fused banks (along each expert's
    inputs), 2:4 by magnitude: what sdsengine.prune would leave, without its calibration."""
    for layer in model.model.layers:
        for module in adapters.pruned_linears(layer).values():
            module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
        for module in layer.modules():
            if experts.is_fused_experts(module):
                for bank in (p for p in module.parameters(recurse=False) if p.dim() == 3):  # biases are 2-D
                    _mask_bank(bank.transpose(1, 2) if module.is_transposed else bank)
    return model


def _mask_bank(bank):
    """bank (experts, out, in), a view: each expert's rows 2:4 along its inputs."""
    bank.mul_(nm_mask(bank.abs().reshape(-1, bank.shape[-1]), 2, 4).reshape(bank.shape))


def layers_that_fit(name, wanted, dtype):
    """Dense weights plus room for a decompressed copy and activations must fit: cut layers, never OOM. A layer's
    and the embeddings' sizes are counted on a one-layer model on the meta device."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        one = AutoModelForCausalLM.from_config(model_config(name, 1, 128), dtype=dtype)
    per_layer = sum(p.numel() for p in one.model.layers[0].parameters()) * dtype.itemsize
    embeddings = sum(p.numel() for p in one.parameters()) * dtype.itemsize - per_layer
    free = torch.cuda.mem_get_info()[0] * 0.8 - 2 * embeddings - (4 << 30)
    # the dense copy, and the converted model: compressed values plus the dense and sdsengine forms it derives
    return max(1, min(wanted, int(free // (4 * per_layer))))


def _prefill_run(model, batch, tokens, graph=False):
    """A function that runs one prefill (under no_grad); graph=True: a CUDA graph's replay, or None where
    capture fails. A converted model's layers are tuned as the prefill will run: eagerly, or replayed."""
    set_graphs(model, graph)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device=model.device)

    @torch.no_grad()
    def prefill():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    prefill()  # tunes SparseLinear for this token count before any capture
    if not graph:
        return prefill
    run, mode = _captured(prefill)  # prefill itself runs under no_grad, captured too
    if mode != "cuda-graph":
        print(f"prefill graph: {mode}")
        return None
    return run


def time_prefill(model, batch, tokens, graph=False):
    """ms per prefill; graph=True: replayed as a CUDA graph, or None where capture fails."""
    run = _prefill_run(model, batch, tokens, graph)
    # enough warm-up for the clocks to rise from idle: 2 warm-ups and 5 calls once timed dense 7.1 and 11.9 ms
    return None if run is None else time_ms(run, 10, 20)


def time_prefills_in_turn(models, batch, tokens, graph=False, rounds=5):
    """ms per prefill of each model, the models timed in turn for `rounds` rounds (the median of each's rounds):
    drift during the run (clocks, heat) then falls on all alike, where a model timed after another carries it
    alone. None where a graph capture fails."""
    runs = [_prefill_run(model, batch, tokens, graph) for model in models]
    if any(run is None for run in runs):
        return None
    rounds_ms = [[time_ms(run, 2, 10) for run in runs] for _ in range(rounds)]
    return [statistics.median(column) for column in zip(*rounds_ms)]


def time_decode(model, batch, prompt, steps, graphs=True, compile_backend=None):
    """(ms per step, mode): single-token steps over a StaticCache holding `prompt` tokens; compile_backend: the
    steps run through torch.compile with that backend (tuned by an eager step first), then as a CUDA graph.
    A converted model's layers are tuned as the steps will run: replayed (graphs), or eagerly."""
    from transformers import StaticCache
    set_graphs(model, graphs)
    # slack for the untimed calls (tuning, warm-up, capture, warm replays): a StaticCache of transformers 5.24
    # advances its own position on each call and replay, whatever cache_position says
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 16)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=model.device)
    step_ids = ids[:, -1:].clone()
    pos = torch.zeros(1, dtype=torch.long, device=model.device)
    kv = {_cache_argument(model): cache}
    forward = model
    with torch.no_grad():
        model(input_ids=ids, **kv, cache_position=torch.arange(prompt, device=model.device))

        def step():
            return forward(input_ids=step_ids, **kv, cache_position=pos,
                           position_ids=pos.view(1, 1).expand(batch, 1)).logits
        pos.fill_(prompt)
        step()  # tunes SparseLinear for this token count before any compile or capture
        if compile_backend:  # inductor fuses what lies between the linears (norms, rotary, SiLU), in both models
            forward = torch.compile(model, backend=compile_backend)
            step()
        run, mode = step, "eager"
        if graphs:
            run, mode = _captured(step)
        mode = f"compiled ({compile_backend}), {mode}" if compile_backend else mode
        return _time_steps(run, pos, prompt, steps), mode


def _cache_argument(model):
    """The KV cache's keyword: transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _captured(step):
    """The step as a CUDA graph replay, or the eager step with the reason capture failed."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(2):  # the first replays upload the graph: not what a step costs
            graph.replay()
        return graph.replay, "cuda-graph"
    except Exception as exc:  # capture is best effort; the eager number is still a number
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return step, f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"


def _time_steps(run, pos, prompt, steps):
    """ms per step over `steps` steps in a row: CUDA events on a GPU, the host clock on the CPU (tests)."""
    def steps_in_a_row():
        for i in range(steps):
            pos.fill_(prompt + i)
            run()
    if pos.device.type != "cuda":
        start = time.perf_counter()
        steps_in_a_row()
        return (time.perf_counter() - start) * 1e3 / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    steps_in_a_row()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def measure_model(model, args):
    prefill_ms = time_prefill(model, args.batch, args.prefill)
    prefill_graph = not (args.no_graphs or getattr(args, "no_prefill_graph", False))
    graph_ms = time_prefill(model, args.batch, args.prefill, graph=True) if prefill_graph else None
    decode = functools.partial(time_decode, model, prompt=args.prompt, steps=args.steps, graphs=not args.no_graphs,
                               compile_backend=getattr(args, "compile", None))
    decode_ms, mode = decode(batch=args.batch)
    # the linear weights as held once run: a converted model's layers keep each form they chose
    held = sum(weight_bytes(model).values())
    # --decode-batches: steps of several sequences at once, each layer's call at that many tokens (after the bytes
    # were counted, as the suite's first runs counted them)
    batches = {batch: decode(batch=batch) for batch in getattr(args, "decode_batches", ())}
    return {"prefill": prefill_ms, "prefill_graph": graph_ms, "decode": decode_ms, "mode": mode, "weight_bytes": held,
            "decode_batches": batches}


def measure_converted(model, args):
    """measure_model, plus the prefill with every SparseLinear on the dense backend: the same GEMMs as the
    dense model, so what remains of a gap there is SparseLinear's own cost (timed after the weights were
    counted: it adds the dense form to every layer)."""
    measured = measure_model(model, args)
    with sparse_linear.use_backend("dense"):
        measured["prefill_forced_dense"] = time_prefill(model, args.batch, args.prefill)
    return measured


def profile_prefill(model, batch, tokens, rows=20):
    """torch.profiler's busiest operators (host and device time) over 3 prefills, as Markdown:
    where a converted model's prefill loses to dense although both run the same GEMMs."""
    from torch.profiler import ProfilerActivity, profile
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync()
        with profile(activities=activities) as prof:
            for _ in range(3):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def records_for(args, layers, dense, sparse, gpu, backend="sparse"):
    """The e2e_prefill and e2e_decode records of a converted model (backend "sparse", or "sparse_lean": the
    same model holding no dense copies) against the dense one."""
    shape = f"{args.model}/{layers}of{CONFIGS[args.model]['num_hidden_layers']}layers"
    lean = backend == "sparse_lean"
    choices = ", ".join(f"{k[0]}x{k[1]}@{k[2]}{'(graphs)' if k[7] else ''}:{b}"  # (graphs): tuned for a replay
                        for k, b in sorted(sparse_linear.autotune_choices().items(), key=str) if k[6] == lean)
    base = {"shape": shape, "dtype": args.dtype, "gpu": gpu, "batch": args.batch, "choices": choices,
            "weight_mib": sparse["weight_bytes"] / 2**20, "dense_weight_mib": dense["weight_bytes"] / 2**20}
    prefill_tokens = args.batch * args.prefill
    prefill_ms, dense_prefill_ms = _eager_prefill(sparse), _eager_prefill(dense)
    return [
        dict(base, bench="e2e_prefill", tokens=args.prefill, backend=backend, ms=prefill_ms,
             dense_ms=dense_prefill_ms, speedup=dense_prefill_ms / prefill_ms,
             tokens_per_s=prefill_tokens / prefill_ms * 1e3,
             dense_tokens_per_s=prefill_tokens / dense_prefill_ms * 1e3,
             first_ms=sparse["prefill"], dense_first_ms=dense["prefill"],
             graph_ms=sparse["prefill_graph"], dense_graph_ms=dense["prefill_graph"],
             graph_speedup=_ratio(dense["prefill_graph"], sparse["prefill_graph"]),
             forced_dense_ms=sparse.get("prefill_forced_dense"), dense_ms_after=dense.get("prefill_after"),
             ms_after=sparse.get("prefill_after"), dense_in_turn_ms=dense.get("prefill_in_turn"),
             in_turn_ms=sparse.get("prefill_in_turn"), dense_graph_in_turn_ms=dense.get("prefill_graph_in_turn"),
             graph_in_turn_ms=sparse.get("prefill_graph_in_turn")),
        _decode_record(base, args.prompt, backend, args.batch, (sparse["decode"], sparse["mode"]),
                       (dense["decode"], dense["mode"])),
    ] + [_decode_record(base, args.prompt, backend, batch, timed, dense["decode_batches"][batch])
         for batch, timed in sparse.get("decode_batches", {}).items() if batch in dense.get("decode_batches", {})]


def _decode_record(base, prompt, backend, batch, timed, dense_timed):
    """An e2e_decode record: steps of `batch` sequences, one token each; timed and dense_timed: (ms, mode)."""
    (ms, mode), (dense_ms, dense_mode) = timed, dense_timed
    return dict(base, bench="e2e_decode", batch=batch, tokens=1, prompt=prompt, backend=backend, ms=ms,
                dense_ms=dense_ms, speedup=dense_ms / ms, mode=mode, dense_mode=dense_mode,
                tokens_per_s=batch / ms * 1e3, dense_tokens_per_s=batch / dense_ms * 1e3)


def _eager_prefill(measured):
    """A model's eager prefill ms: the lower of its first timing and the one taken again last, where there is
    one. The first dense timing carries the GPU's warm-up alone: on the H200 (12-04) dense took 10.50 ms first
    and 5.63 last, the converted model 6.72 and 6.27, so first against first read 1.56x where it was 0.90x."""
    return min(ms for ms in (measured["prefill"], measured.get("prefill_after")) if ms is not None)


def prefill_diagnosis(record):
    """One line that reads the e2e_prefill record's extra timings (None: not measured)."""
    ms = {k: record.get(k) for k in ("dense_ms", "ms", "dense_first_ms", "first_ms", "dense_graph_ms", "graph_ms",
                                      "forced_dense_ms", "dense_ms_after", "ms_after", "dense_in_turn_ms",
                                      "in_turn_ms", "dense_graph_in_turn_ms", "graph_in_turn_ms")}
    text = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in ms.items())
    return (f"prefill ms: {text} (dense_ms, ms: the lower of first and after; graph: replayed as a CUDA graph, "
            "no host overhead; forced_dense: the converted model with every SparseLinear on the dense backend; "
            "dense_ms_after, ms_after: each model again, last; in_turn: both models timed in turn, 5 rounds)")


def _ratio(a, b):
    return a / b if a and b else None


def main(argv=None):
    require_transformers((4, 56), "from_config(dtype=), logits_to_keep")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(CONFIGS))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=2048, help="prefill tokens per sequence")
    parser.add_argument("--prompt", type=int, default=512, help="tokens in the KV cache while decoding")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--decode-batches", type=tokens_argument, default=(),
                        help="also decode these many sequences at once (e.g. 16: each linear at 16 tokens), both "
                             "models, tuned as the steps run (CUDA graphs: by the GPU's time)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="no CUDA graphs: decode eagerly, and no graph-replayed prefill")
    parser.add_argument("--no-prefill-graph", action="store_true",
                        help="no graph-replayed prefill (a packed mixture's prefill runs its experts one at a time, "
                             "reading their token counts on the host: no capture can hold it); decode still in graphs")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="decode steps through torch.compile (default backend inductor) for both models, then "
                             "as CUDA graphs: what lies between the linears fused, as a user's compiled model runs")
    parser.add_argument("--profile", action="store_true",
                        help="also write <name>_prefill_profile.md: profiler tables of dense and 2:4 prefills")
    parser.add_argument("--lean", action="store_true",
                        help="last, the converted model again with set_lean (no dense copies): its memory and speed")
    parser.add_argument("--name", default="e2e", help="results file stem")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if no_gpu("bench_e2e"):
        return 1
    dtype = getattr(torch, args.dtype)
    layers = layers_that_fit(args.model, args.layers, dtype)
    note = "" if layers == args.layers else f" (cut from {args.layers} to fit GPU memory)"
    print(f"bench_e2e: {args.model} with {layers} decoder layers{note}, random weights pruned 2:4; {gpu_info()}")
    dense_model = build_model(args.model, layers, dtype, args.prompt + args.steps + args.prefill + 16)
    dense = measure_model(dense_model, args)
    print(f"dense: {dense}", flush=True)
    model = convert(copy.deepcopy(dense_model), pack_experts=True)  # what a mixture's packed experts cost
    torch.cuda.empty_cache()
    sparse = measure_converted(model, args)
    print(f"sparse: {sparse}", flush=True)
    # the records first, the diagnostics after: a run cut off by the GPU suite's time limit keeps them
    _write(args, layers, dense, sparse, note)
    dense["prefill_after"] = time_prefill(dense_model, args.batch, args.prefill)  # drift since the first
    sparse["prefill_after"] = time_prefill(model, args.batch, args.prefill)  # and since the tuning
    print(f"prefill again, last: dense {dense['prefill_after']:.3f} ms, converted {sparse['prefill_after']:.3f} ms",
          flush=True)
    for graph, key in ((False, "prefill_in_turn"), (True, "prefill_graph_in_turn")):
        if graph and (args.no_graphs or args.no_prefill_graph):
            continue
        in_turn = time_prefills_in_turn([dense_model, model], args.batch, args.prefill, graph=graph)
        if in_turn is not None:
            dense[key], sparse[key] = in_turn
    records = _write(args, layers, dense, sparse, note)
    print(prefill_diagnosis(records[0]))
    if args.profile:
        profiles = {"dense": profile_prefill(dense_model, args.batch, args.prefill),
                    "2:4 (converted)": profile_prefill(model, args.batch, args.prefill)}
        write_profiles(Path(args.out) / f"{args.name}_prefill_profile.md", profiles, args, layers)
    if args.lean:
        sparse_linear.set_lean(model)  # drops every derived form: tuned and derived again, lean
        torch.cuda.empty_cache()
        lean = measure_model(model, args)
        print(f"lean: {lean}", flush=True)
        _write(args, layers, dense, sparse, note, lean)
    return 0


def _write(args, layers, dense, sparse, note, lean=None):
    gpu = torch.cuda.get_device_name()
    records = records_for(args, layers, dense, sparse, gpu)
    if lean is not None:
        records += records_for(args, layers, dense, lean, gpu, backend="sparse_lean")
    for r in records:
        print(f"{r['bench']} {r['backend']}: {r['dense_tokens_per_s']:.1f} -> {r['tokens_per_s']:.1f} tokens/s "
              f"({r['speedup']:.3f}x), weights {r['weight_mib']:.0f} MiB against {r['dense_weight_mib']:.0f}{note}")
    print(f"wrote {write_results(args.name, records, args.out)}", flush=True)
    return records


def write_profiles(path, profiles, args, layers):
    lines = [f"# Prefill profiles: {args.model}, {layers} layers, batch {args.batch}, {args.prefill} tokens, "
             f"{args.dtype}", "", ", ".join(f"{k} {v}" for k, v in gpu_info().items()), ""]
    for label, text in profiles.items():
        lines += [f"## {label}", "", "```", text, "```", ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
