"""`sdsengine bench`: dense vs 2:4 sparse for each Linear shape of your model and each token count, on your GPU.

Every call reads its weight from HBM, as in a real forward pass: the weights are rotated over enough random
2:4 copies to overflow the L2 cache. Each backend is checked against dense once before it is timed. The
`auto` row is what SparseLinear picks for that token count after its own measurement, timing calls as eager code
makes them; `auto-graphs` what a layer set for CUDA graphs picks (SparseLinear.graphs: the GPU's time alone). For
a mixture of experts, also each experts projection as a packed mixture runs it at decode (all experts in one
launch of the grouped kernel) against the dense grouped product transformers runs (torch._grouped_mm), on random
routing.

The second half of this module is the one benchmark harness (timing, GPU and library versions, copy
bandwidth, records as JSON and Markdown); benchmarks/harness.py re-exports it.
"""
import functools
import importlib.metadata
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from sdsengine import ops
from sdsengine.files import check_new_file, write_whole
from sdsengine.kernels import compress_24, decompress_24
from sdsengine.masks import nm_mask
from sdsengine.nn import grouped, sparse_linear

LLAMA_SHAPES = {  # (out_features, in_features): projections sharing it
    "llama-2-7b": {(4096, 4096): "q,k,v,o", (11008, 4096): "gate,up", (4096, 11008): "down"},
    "llama-3-8b": {(4096, 4096): "q,o", (1024, 4096): "k,v", (14336, 4096): "gate,up", (4096, 14336): "down"},
}
DEFAULT_TOKENS = "1,16,128,512,2048"


def add_arguments(parser):
    parser.add_argument("--model", default=None, help="time the Linear shapes of this model (loaded by the CLI)")
    parser.add_argument("--shapes", default=None, help="OUTxIN list, e.g. 4096x4096,11008x4096 "
                                                       "(default: the model's, else Llama-2-7B's)")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help=f"token counts (default {DEFAULT_TOKENS})")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement (median)")
    parser.add_argument("--json", default=None, help="also write the records to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def run(args, load_model=None):
    """Print the table; returns a process exit code. load_model(name) -> model (or a tuple led by it)."""
    tokens = parse_tokens(args.tokens)  # arguments are checked first, GPU or not
    if args.shapes:
        odd = [f"{o}x{i}" for o, i in parse_shapes(args.shapes) if i % 32]
        if odd:
            raise ValueError(f"--shapes: a 2:4 layer needs in_features (the second number) divisible by 32, "
                             f"got {', '.join(odd)}")
    if args.iters < 1:
        raise ValueError(f"--iters must be at least 1, got {args.iters}")
    if args.json:
        check_new_file("--json", args.json, args.overwrite)
    if not torch.cuda.is_available():
        print("sdsengine bench: needs a CUDA GPU; none is visible, nothing measured")
        return 1
    shapes, groups = _shapes_from_args(args, load_model)
    dtype = getattr(torch, args.dtype)
    checked = ops.probe("cuda", dtype, self_check=True)["backends"]
    print("backends (self-checked against dense): " + "; ".join(f"{b}: {s}" for b, s in checked.items()))
    records = []
    for shape, users in shapes.items():
        records += measure(shape, tokens, dtype, iters=args.iters, users=users)
    for (experts, k, *shape), users in groups.items():
        served = [n for n in tokens if grouped.in_regime(n, k, experts)]  # the grouped path's regime
        if served:
            records += measure_grouped(tuple(shape), experts, k, served, dtype, iters=args.iters, users=users)
    print(header(dtype))
    print(table(records))
    if args.json:
        write_json(args.json, records)
    return int(any(r["status"] != "ok" for r in records))


def _shapes_from_args(args, load_model):
    """({(out, in): users} to time as single layers, {(experts, top_k, out, in): users} as grouped experts)."""
    if args.shapes:
        return dict.fromkeys(parse_shapes(args.shapes), ""), {}
    if args.model:
        if load_model is None:
            raise ValueError("--model needs a model loader; pass --shapes instead")
        loaded = load_model(args.model)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        return model_shapes(model), expert_groups(model)
    return LLAMA_SHAPES["llama-2-7b"], {}


def parse_shapes(text):
    """'4096x4096,11008x4096' -> [(4096, 4096), (11008, 4096)] as (out_features, in_features)."""
    shapes = []
    for item in filter(None, text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes takes OUTxIN pairs of positive integers such as 4096x4096, got {item!r}")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def parse_tokens(text, flag="--tokens"):
    """'1,16,128' -> [1, 16, 128]: positive token counts; a bad list is an error naming `flag` ("" where the caller
    names it, as argparse does)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items or not all(t.isdigit() and int(t) > 0 for t in items):
        raise ValueError(f"{flag} takes positive integers such as 1,16,128, got {text!r}".lstrip())
    return [int(t) for t in items]


def model_shapes(model, ignore=("lm_head",)):
    """{(out, in): 'names'} of the model's Linear/Conv1D layers that SparseLinear can hold (in % 32 == 0), a
    mixture's experts included (each expert's projection is one such layer once converted: 'experts.down_proj')."""
    from sdsengine.nn.convert import Conv1D
    from sdsengine.pipeline import experts
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] not in ignore:
            found = {name.rsplit(".", 1)[-1]: module.weight.shape[::-1] if isinstance(module, Conv1D) else
                     module.weight.shape}
        elif experts.is_fused_experts(module):
            found = {f"experts.{bank}": getattr(module, bank).shape[1:][::-1 if module.is_transposed else 1]
                     for bank in experts.bank_names(module) if bank not in ignore}
        else:
            continue
        for short, out_in in found.items():
            if out_in[1] % 32 == 0:
                shapes.setdefault(tuple(out_in), set()).add(short)
    return {shape: ",".join(sorted(names)) for shape, names in shapes.items()}


def expert_groups(model):
    """{(experts, top_k, out, in): 'names'} of a mixture's fused experts projections that a packed model runs
    grouped: those of modules whose every projection can convert (in % 32 == 0; the grouped path needs all).
    top_k from the config (num_experts_per_tok, or the names ERNIE and HunYuan use; a multimodal model's
    text_config); none where it names none."""
    from sdsengine.pipeline import experts
    configs = (model.config, getattr(model.config, "text_config", None))
    k = next((v for c in configs if c is not None for v in (getattr(c, n, None) for n in
              ("num_experts_per_tok", "moe_k", "moe_topk")) if v is not None), None)
    k = max(k) if isinstance(k, (list, tuple)) else k  # HunYuan may list one per layer
    groups = {}
    for module in model.modules() if isinstance(k, int) else ():
        if experts.is_fused_experts(module):
            shapes = {}
            for bank in experts.bank_names(module):
                count, *out_in = getattr(module, bank).shape
                shapes[bank] = (count, min(k, count), *(out_in[::-1] if module.is_transposed else out_in))
            for bank, key in shapes.items() if all(key[3] % 32 == 0 for key in shapes.values()) else ():
                groups.setdefault(key, set()).add(f"experts.{bank}")
    return {key: ",".join(sorted(names)) for key, names in groups.items()}


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------

def measure(shape, tokens, dtype, iters=50, users=""):
    """Records for one weight shape: per token count, dense and every available sparse backend, then auto."""
    weights = random_24_weights(shape, dtype)
    forms = {"dense": [ops.prepare("dense", v, m) for v, m in weights]}
    for backend in ops.available("cuda", dtype):
        if backend != "dense":
            try:
                forms[backend] = [ops.prepare(backend, v, m) for v, m in weights]
            except ops.BackendUnavailable:
                pass
    layers = []
    for graphs in (False, True):  # tuned as eager code calls it, and as a CUDA graph replays it
        layer = sparse_linear.SparseLinear(shape[1], shape[0], bias=False, device="cuda", dtype=dtype)
        layer.values.copy_(weights[0][0])
        layer.meta.copy_(weights[0][1])
        layer.graphs = graphs
        layers.append(layer)
    records = []
    for n in tokens:
        records += _measure_tokens(shape, n, dtype, forms, layers, iters, users)
    return records


def random_24_weights(shape, dtype):
    """Enough random 2:4 weights (compressed) that cycling through them overflows L2 three times, counted in
    the compressed bytes (9 bits per weight), the smallest form a backend reads: sized by the dense bytes,
    11008x4096 got 2 copies, 48 MiB each compressed, against the H100's 50 MiB L2."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    copies = max(3, min(16, math.ceil(3 * l2 / (shape[0] * shape[1] * 9 / 8))))
    return [random_24(shape, dtype, torch.Generator(device="cuda").manual_seed(seed)) for seed in range(copies)]


def random_24(shape, dtype, generator):
    """A random weight pruned 2:4 by magnitude, compressed (values, meta), on the generator's device."""
    w = torch.randn(*shape, device=generator.device, dtype=dtype, generator=generator)
    return compress_24(w * nm_mask(w.abs(), 2, 4))


def _measure_tokens(shape, n, dtype, forms, layers, iters, users):
    """Records at n tokens: {backend: [prepared weight copies]} forms, dense's first; each of layers holds copy 0
    (an auto row for each: auto, or auto-graphs for a layer set for CUDA graphs)."""
    x = torch.randn(n, shape[1], device=forms["dense"][0].device, dtype=dtype)
    ref = ops.run("dense", forms["dense"][0], x, None, shape[0])
    base = {"bench": "spmm", "shape": f"{shape[0]}x{shape[1]}", "layers": users, "tokens": n,
            "dtype": str(dtype).removeprefix("torch."), "gpu": gpu_info()["gpu"]}
    times, records = {}, []
    for backend, copies in forms.items():
        try:
            err = ops.relative_error(ops.run(backend, copies[0], x, None, shape[0]), ref)
            for form in copies[1:]:  # each copy's first call at a token count may do one-off work, not timed:
                if backend == "cusparselt":  # its algorithm search, which depends on the shape alone
                    form["alg"].update(copies[0]["alg"])
                ops.run(backend, form, x, None, shape[0])
            call = _cycling(backend, copies, x, shape[0])  # cold by rotation
            # ms as called from Python (host work included, as in eager use); device_ms the GPU's own time,
            # as a CUDA graph runs it: at 1-16 tokens the host side can outlast the kernel
            times[backend] = (time_ms(call, 5, iters), time_ms(call, 5, iters, hide_host=True), err)
        except RuntimeError as exc:  # a backend refusing a token count is a result, not a crash
            print(f"sdsengine bench: {backend} failed on {shape} x {n}: {exc}")
            records.append(dict(base, backend=backend, status="failed", error=str(exc)[:400]))
    if "dense" not in times:  # nothing to compare with: the backends that ran are recorded, unrated
        return records + [dict(base, backend=b, status="failed", error="no dense baseline at this token count")
                          for b in times]
    records += [_record(base, shape, n, b, times[b], times["dense"]) for b in times]
    for record in records:
        if record["backend"] == "sdsengine" and "ms" in record:  # its split-K (ops.split_k), cached by then
            record["split_k"] = ops.split_k(forms["sdsengine"][0], x, None, shape[0])
    for layer in layers:
        with torch.no_grad():
            layer(x)
        choice = sparse_linear.autotune_choices()[layer._key(n)]
        label = f"{'auto-graphs' if layer.graphs else 'auto'}:{choice}"
        if choice in times:
            records.append(_record(base, shape, n, choice, times[choice], times["dense"], label=label))
        else:
            records.append(dict(base, backend=label, status="failed",
                                error=f"the layer chose {choice}, which failed at this token count"))
    return records


def _record(base, shape, n, backend, timed, dense, label=None):
    (ms, device_ms, err), (dense_ms, dense_device_ms, _) = timed, dense
    return dict(base, backend=label or backend, status="ok", ms=ms, dense_ms=dense_ms, speedup=dense_ms / ms,
                device_ms=device_ms, dense_device_ms=dense_device_ms, device_speedup=dense_device_ms / device_ms,
                rel_err=err, **rates(shape, n, ms, sparse=backend != "dense"))


def _cycling(backend, copies, x, out_features):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(copies)
        return ops.run(backend, copies[state["i"]], x, None, out_features)
    return call


def measure_grouped(shape, experts, k, tokens, dtype, iters=20, users="", device="cuda"):
    """Records for one experts projection (each expert's weight `shape`): per token count, the grouped 2:4 kernel
    (ops.run_grouped) against torch._grouped_mm on the same routed rows (random distinct top-k, seed 0), L2
    overwritten before each call. ms as called from Python; device_ms the GPU's own time, as a graph replays it."""
    dense, form = random_experts(experts, shape, dtype, device)
    return [_measure_grouped_tokens(shape, experts, k, dense, form, n, iters, users) for n in tokens]


def random_experts(experts, shape, dtype, device="cuda"):
    """(dense 2:4 weights [E, out, in], the grouped form of the same)."""
    g = torch.Generator(device=device).manual_seed(0)
    pairs = [random_24(shape, dtype, g) for _ in range(experts)]
    dense = torch.empty(experts, *shape, device=device, dtype=dtype)  # filled in place: no second dense copy
    for e, pair in enumerate(pairs):
        dense[e] = decompress_24(*pair)
    return dense, ops.grouped_form(pairs)


def random_routing(tokens, experts, k, device, seed=0):
    """k distinct experts per token, as a router's topk picks them."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)


def _measure_grouped_tokens(shape, experts, k, dense, form, tokens, iters, users):
    index = random_routing(tokens, experts, k, dense.device)
    token, _, offsets, groups = grouped.device_routes(index, experts)
    x = torch.randn(tokens, shape[1], device=dense.device, dtype=dense.dtype)[token]
    base = {"bench": "grouped", "layers": users, "shape": f"{experts}x{shape[0]}x{shape[1]}", "tokens": tokens,
            "top_k": k, "dtype": str(dense.dtype).removeprefix("torch."), "gpu": gpu_info()["gpu"],
            "backend": "sdsengine", "baseline": "torch._grouped_mm"}
    ref = ops.grouped_reference(x, dense, offsets, groups, tokens)
    sides = {"sparse": lambda: ops.run_grouped(form, x, offsets, groups, tokens, None, shape[0]),
             # torch._grouped_mm's offs: where each expert's rows end
             "dense": lambda: torch._grouped_mm(x, dense.transpose(1, 2), offs=offsets[1:])}
    if ops.even_rows(x, groups, tokens) < tokens:  # the token tile the kernel had before, sized for every row
        sides["tiles_for_all_rows"] = lambda: ops.run_grouped(form, x, offsets, groups, tokens, None, shape[0], tokens)
    timed, errors = {}, {}
    for side, fn in sides.items():
        try:
            timed[side] = (ops.relative_error(fn(), ref), time_ms(fn, 5, iters, flush=True),
                           time_ms(fn, 5, iters, flush=True, hide_host=True))
        except (RuntimeError, AttributeError) as exc:  # a torch without _grouped_mm for this dtype or GPU: a result
            errors[side] = f"{side}: {str(exc)[:400]}"
    if "sparse" not in timed:
        return dict(base, status="failed", error=errors["sparse"])
    err, ms, device_ms = timed["sparse"]
    active = len(set(index.flatten().tolist()))
    read = active * shape[0] * shape[1] * dense.element_size() * 9 / 16  # the compressed bytes of experts with rows
    record = dict(base, ms=ms, device_ms=device_ms, tbps=read / device_ms / 1e9, rel_err=err, mismatch=err > 2e-2)
    if "tiles_for_all_rows" in timed:  # which token tile serves best: an answer for the next GPU lease
        all_err, all_ms, all_device_ms = timed["tiles_for_all_rows"]
        record.update(tiles_for_all_rows_ms=all_ms, tiles_for_all_rows_device_ms=all_device_ms,
                      mismatch=record["mismatch"] or all_err > 2e-2)
    elif "tiles_for_all_rows" in errors:
        record["tiles_for_all_rows_error"] = errors["tiles_for_all_rows"]
    if "dense" not in timed:  # ours measured, unrated
        return dict(record, status="failed", error=f"no dense baseline: {errors['dense']}")
    dense_err, dense_ms, dense_device_ms = timed["dense"]
    status = "wrong" if record["mismatch"] else "baseline wrong" if dense_err > 2e-2 else "ok"
    return dict(record, dense_ms=dense_ms, dense_device_ms=dense_device_ms, speedup=dense_ms / ms,
                device_speedup=dense_device_ms / device_ms, dense_rel_err=dense_err, status=status)


def rates(shape, n, ms, sparse):
    """Dense-equivalent TFLOP/s, and TB/s of the bytes one call must move (2:4: 9 bits per weight)."""
    out_features, in_features = shape
    weight_bytes = out_features * in_features * (9 / 8 if sparse else 2)
    moved = weight_bytes + 2 * n * (in_features + out_features)
    return {"tflops": 2 * n * out_features * in_features / ms / 1e9, "tbps": moved / ms / 1e9}


# ---------------------------------------------------------------------------------------------------
# The harness: timing, environment and records, shared by `sdsengine bench` and benchmarks/ (whose
# harness.py re-exports these); the CUDA-event timer itself is ops.time_ms, shared with the autotuner
# ---------------------------------------------------------------------------------------------------

COLUMNS = ("bench", "method", "shape", "layers", "tokens", "dtype", "pattern", "backend", "split_k", "ms",
           "device_ms", "baseline_ms", "dense_ms", "dense_device_ms", "tiles_for_all_rows_device_ms", "copy_ms",
           "speedup", "device_speedup", "vs_copy", "tflops", "tbps", "gbps", "frac_copy_bw", "weight_mib",
           "baseline_weight_mib", "dense_weight_mib", "seconds", "seconds_per_layer", "gpu_peak_allocated_gib",
           "cpu_peak_rss_gib", "mismatch", "rel_err", "target_met", "status")


def time_ms(fn, warmup=5, reps=50, flush=False, hide_host=False):
    """Median milliseconds of fn(): CUDA events where a GPU is visible (L2 overwritten before each call if
    `flush`; the host's share hidden if `hide_host`, see ops.time_ms), else the host clock, for CPU smoke runs."""
    if torch.cuda.is_available():
        return ops.time_ms(fn, warmup, reps, flush=flush, hide_host=hide_host)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes=1 << 30, reps=20):
    """GB/s of a device-to-device copy of random bytes, counting bytes read plus written: the ceiling a
    memory-bound kernel is held to, measured in the same run as the kernel."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=reps)
    return 2 * nbytes / ms / 1e6


def gpu_info():
    """GPU name, compute capability, driver and library versions (gpu 'cpu' where no GPU is visible)."""
    return dict(_gpu_info())


@functools.lru_cache(maxsize=1)
def _gpu_info():
    info = {"gpu": "cpu", "capability": None, "driver": None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": _package_version("triton"), "python": platform.python_version()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability="%d.%d" % torch.cuda.get_device_capability(),
                    driver=_driver_version())
    return info


def _package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def stamped(records):
    """The records with the GPU and library versions in each (a record's own fields win)."""
    env = gpu_info()
    return [{**r, **{k: v for k, v in env.items() if k not in r}} for r in records]


def write_json(path, records):
    """Whole or not at all: the GPU suite kills a step at its time limit, and a half-written file would
    stop the summary (and hide the records written before)."""
    write_whole(path, json.dumps(stamped(records), indent=1) + "\n")


def write_results(name, records, directory="benchmarks/results", columns=COLUMNS):
    """<directory>/<name>.json (a list of records, versions stamped in each) and <name>.md (the table of those
    `columns` that some record has)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", records)
    (out / f"{name}.md").write_text(f"{header()}\n\n{table(records, columns)}\n")
    return out / f"{name}.json"


def header(dtype=None):
    env = gpu_info()
    dt = f", {str(dtype).removeprefix('torch.')}" if dtype else ""
    return (f"sdsengine bench on {env['gpu']} ({env['capability']}){dt}; driver {env['driver']}, torch "
            f"{env['torch']}, CUDA {env['cuda']}, triton {env['triton']}; ms = median of timed calls")


def table(records, columns=COLUMNS):
    """Markdown table, one row per record, of those `columns` that some record has."""
    cols = [c for c in columns if any(c in r for r in records)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(value):
    if value is None:  # not measured, or not meaningful for this record
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
