"""Command line: `sdsengine prune | eval | convert | bench | demo`. Flags come from the config dataclasses."""
import argparse
import contextlib
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from sdsengine import api, bench, checkpoint, files, report, transformers_compat
from sdsengine.algorithms import METHODS, lookup
from sdsengine.config import CalibrationConfig, PruneConfig, SparsityPattern, check_device
from sdsengine.data import EVAL_TASKS, check_calibration_source, resolve_data_dir
from sdsengine.eval.runner import (TASK_HELP, check_perplexity, evaluate, evaluate_checkpoint,
                                   load_zeroshot, results_table, task_list)
from sdsengine.eval.zeroshot import BATCH_SIZE
from sdsengine.models import default_gguf, load_model, weights_directory
from sdsengine.nn import convert, save_compressed, set_lean
from sdsengine.nn.convert import check_some_converted, fused_bank_share, is_compressed_checkpoint, weight_count
from sdsengine.nn.convert_streamed import write_converted
from sdsengine.pipeline import memory, parallel, streaming
from sdsengine.pipeline.resume import ResumeStore


class _Once(argparse.Action):
    """A setting given again with another value, under the same flag or an alias (Wanda's --prune_method
    and --save_model, --calib), is refused instead of the last one silently winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier not in (None, self.default, values):
            parser.error(f"{option_string} {values} contradicts the {earlier} given before for the same setting")
        setattr(namespace, self.dest, values)


def _add_config_flags(parser, classes):
    """One flag per dataclass field; a field several methods define (--lr) gets each one's help, and
    defaults stay in the configs (each method keeps its own)."""
    kinds, helps = {}, {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            # a number where any method's default is one (BESA's lr defaults to None, SDS's to 0.1); a tuple
            # (--ignore) for lists; else str
            if kinds.get(f.name, str) is str:
                kinds[f.name] = type(f.default) if type(f.default) in (int, float, tuple) else str
            text = f.metadata.get("help", "")
            if text and text not in helps.setdefault(f.name, []):
                helps[f.name].append(text)
    for name, kind in kinds.items():
        text = "; ".join(helps.get(name, []))
        if kind is tuple:  # a list: repeated flags add up, each may hold several comma-separated items
            parser.add_argument(_flag(name), dest=name, action="append", default=None,
                                help=text + " (comma-separated; the flag may be repeated)")
        else:
            parser.add_argument(_flag(name), dest=name, type=kind, default=None, action=_Once, help=text)


def _flag(name):
    """The command-line flag of a config field: data_dir -> --data-dir."""
    return "--" + name.replace("_", "-")


def _config_from(args, cls):
    """Build cls from the flags the user passed; a passed flag that cls does not take is an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for name, value in vars(args).items():
        if value is None or name not in args._config_flags:
            continue
        if name not in names:
            continue
        values[name] = _listed(value) if isinstance(value, list) else value
    return cls(**values)


def _listed(flags):
    """The items of a repeatable list flag (action="append"), each occurrence comma-separated."""
    return tuple(item for flag in flags or () for item in flag.split(",") if item)


def _reject_foreign_flags(args, config_class):
    method_flags = {f.name for c, _ in METHODS.values() for f in dataclasses.fields(c)}
    mine = {f.name for f in dataclasses.fields(config_class)}
    for name in method_flags - mine:
        if getattr(args, name, None) is not None:
            raise ValueError(f"{_flag(name)} does not apply to method {args.method!r}")


def _dtype(args):
    return None if args.dtype is None else getattr(torch, args.dtype)


def _add_model_flags(parser):
    parser.add_argument("--model", default=None, action=_Once, help="hub id, local HF directory or .gguf file "
                                                                     "(default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], action=_Once,
                        help="default: float32; a compressed checkpoint (eval) keeps the dtype it was saved in; "
                             "convert keeps a float16/bfloat16 checkpoint's, else bfloat16")


def build_parser():
    parser = argparse.ArgumentParser(prog="sdsengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model layer by layer and save a HF checkpoint",
                       epilog="several GPUs: torchrun --nproc-per-node N -m sdsengine.cli prune ... --device cuda "
                              "(data-parallel: each process calibrates on its share of the windows; README)")
    _add_model_flags(p)
    p.add_argument("--method", "--prune_method", required=True, action=_Once,
                   help=f"one of: {', '.join(sorted(METHODS))}")
    _add_config_flags(p, [PruneConfig] + [c for c, _ in METHODS.values()] + [CalibrationConfig])
    p.add_argument("--calib", dest="dataset", default=None, action=_Once, help="alias of --dataset")
    p.add_argument("--out", "--save_model", required=True, action=_Once, help="output directory (a HF checkpoint)")
    _add_wanda_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--resume-dir", default=None, action=_Once,
                   help="keep the run's progress here after every layer; the same command run again goes on after "
                        "the last finished layer (removed once saved)")
    p.add_argument("--stream-weights", action="store_true",
                   help="read each layer's weights from the model's safetensors files for its turn and write it pruned "
                        "to --out as it is done: host memory holds about one layer, for a model larger than it (a "
                        "safetensors checkpoint directory or hub id, a mixture's experts included)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the command (model layout, --ignore, pattern, calibration data, --out) and print what "
                        "it would prune and the memory it would keep, reading no weights; nothing is pruned or saved")

    e = sub.add_parser("eval", help="perplexity (and zero-shot) evaluation")
    _add_model_flags(e)
    _add_eval_flags(e)
    e.add_argument("--json", default=None, help="write the results as JSON to this file")
    e.add_argument("--samples", default=None, help="write every zero-shot item's answer to this JSONL file: "
                   "task, index, label, pred, pred_norm, choices, loglikelihoods (to compare models' answers)")
    e.add_argument("--overwrite", action="store_true", help="replace existing --json / --samples files")
    e.add_argument("--lean", action="store_true", help="a compressed checkpoint's SparseLinears hold no "
                   "decompressed copy of their weights: less memory, slower where the dense backend runs")
    e.add_argument("--batch-size", type=int, default=None,
                   help=f"zero-shot inputs per forward, padded to the longest (default {BATCH_SIZE}; "
                        "--stream-weights runs each alone, as --batch-size 1 does)")
    e.add_argument("--stream-weights", action="store_true",
                   help="read each decoder layer's weights from the model's safetensors files for its turn, a task's "
                        "windows (a zero-shot task's inputs) all going through one layer before the next: host memory "
                        "holds about one layer beside their hidden states, for a model larger than it")

    c = sub.add_parser("convert", help="replace the 2:4 linears of a pruned checkpoint by SparseLinear and save")
    _add_model_flags(c)
    c.add_argument("--out", required=True, help="output directory (compressed checkpoint)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--ignore", action="append", default=None,
                   help="module-name patterns kept dense besides lm_head (comma-separated; the flag may be repeated)")
    c.add_argument("--pack-experts", action="store_true",
                   help="a mixture's experts too, one SparseLinear per expert: less memory; at decode on a GPU one "
                        "grouped launch per projection, whose speed against the fused dense experts is not measured "
                        "yet (see the README); by default they stay fused and dense")
    c.add_argument("--stream-weights", action="store_true",
                   help="read each linear's weight from the checkpoint's safetensors files and write it compressed as "
                        "it comes: host memory holds about one linear's weight (with --pack-experts, one experts "
                        "module's), for a checkpoint larger than it")

    b = sub.add_parser("bench", help="dense vs 2:4 per layer shape and token count on this GPU")
    bench.add_arguments(b)

    d = sub.add_parser("demo", help="prune the embedded SmolLM2-135M to 2:4 and compare with dense")
    d.add_argument("--method", default="sparsegpt")
    d.add_argument("--nsamples", type=int, default=16)
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--limit", type=int, default=40, help="evaluation windows (0: the whole test set)")
    d.add_argument("--data-dir", default=None)
    d.add_argument("--device", default="cpu")
    return parser


def _add_wanda_flags(parser):
    """The flags of Wanda's main.py, which many follow-ups copy, so that its commands run here with only its
    --save dropped (--prune_method and --save_model are aliases above; --nsamples and --seed are ours)."""
    wanda = parser.add_argument_group("Wanda's flags", "--sparsity_ratio R --sparsity_type {unstructured,N:M} "
                                      "mean --sparsity R or --sparsity N:M")
    wanda.add_argument("--sparsity_ratio", type=float, default=None, action=_Once)
    wanda.add_argument("--sparsity_type", default=None, action=_Once)
    # without it, argparse would read Wanda's --save (a log directory) as an abbreviation of --save_model
    wanda.add_argument("--save", default=None, help=argparse.SUPPRESS)


def sparsity_from(args) -> str:
    """The pattern from --sparsity, or from Wanda's --sparsity_ratio and --sparsity_type (not both)."""
    ratio, kind = args.sparsity_ratio, args.sparsity_type
    if ratio is None and kind is None:
        if args.sparsity is None:
            raise ValueError("the sparsity is required: --sparsity 0.5 or 2:4 (or Wanda's --sparsity_ratio "
                             "and --sparsity_type)")
        return args.sparsity
    if args.sparsity is not None:
        raise ValueError("give --sparsity or Wanda's --sparsity_ratio/--sparsity_type, not both")
    if kind in (None, "unstructured"):
        if ratio is None:
            raise ValueError("--sparsity_type unstructured needs --sparsity_ratio")
        return str(ratio)
    pattern = SparsityPattern.parse(kind)
    if not pattern.nm:
        raise ValueError(f"--sparsity_type {kind!r}: use unstructured or N:M (2:4, 4:8)")
    if ratio is not None and abs(ratio - pattern.sparsity) > 1e-9:
        raise ValueError(f"--sparsity_type {kind} is {pattern.sparsity:g} sparse, but --sparsity_ratio is {ratio:g}")
    return kind


def _add_eval_flags(parser):
    parser.add_argument("--tasks", default="wikitext2", help=TASK_HELP)
    parser.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens (default 2048)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N windows / items")
    parser.add_argument("--data-dir", default=None, help="offline data directory (env SDSENGINE_DATA_DIR)")
    parser.add_argument("--device", default="cpu", help="cpu (the default) or cuda")


def prune_configs(args):
    """The method's config and the calibration config that `sdsengine prune` args ask for."""
    config_class, _ = lookup(args.method)
    _reject_foreign_flags(args, config_class)
    if args.save is not None:
        raise ValueError("Wanda's --save (a log directory) is not taken: the run report is saved with the model "
                         "(sdsengine.json in --out / --save_model)")
    args.sparsity = sparsity_from(args)
    return _config_from(args, config_class), _config_from(args, CalibrationConfig)


def cmd_prune(args):
    needs_data = lookup(args.method)[1].STATS is not None
    if not needs_data:
        _warn_unused_calibration(args)
        args.sequential = None  # ignored, so not recorded in the recipe either
        args.resume_dir = None  # ignored: neither checked nor cleared (it may hold another run's progress)
    config, calib = prune_configs(args)
    check_device(config.device)  # before any work, as is the output directory
    with parallel.joined(config.device) as device:  # under torchrun: data-parallel (pipeline/parallel.py)
        config.device = device  # this process's GPU there
        parallel.check(config)
        _prune_and_save(args, config, calib, needs_data)


def _prune_and_save(args, config, calib, needs_data):
    _note_unused_gpu(config.device)
    _refuse_out_over_inputs(args, "pruned", calib)
    try:
        out = checkpoint.check_output_dir(args.out, args.overwrite)
    except FileExistsError as exc:
        raise FileExistsError(f"{exc}{_finished_progress(args)}") from None
    if args.resume_dir:
        progress = Path(args.resume_dir).expanduser().resolve()
        if files.within(progress, out):
            raise ValueError(f"--resume-dir {args.resume_dir} lies in --out {args.out}, which the checkpoint replaces: "
                             "keep the progress elsewhere")
        ResumeStore(args.resume_dir).check()
    if needs_data:
        check_calibration_source(calib)
    if args.dry_run:
        model, tokenizer, source = load_model(args.model, _dtype(args), skeleton=True)
        if args.stream_weights:  # the names and shapes checked now, as the run will (reading no weight)
            streaming.WeightStream(model, streaming.checkpoint_files(weights_directory(source)))
        plan = api.plan(model, config, calib if needs_data else None, tokenizer)
        print(_plan_text(plan, source, args.stream_weights))
        return
    calib = calib if needs_data else None
    if args.stream_weights:  # the first process writes each layer to --out as it is done
        result = api.prune_checkpoint(args.model, out, config, calib, _dtype(args), args.overwrite,
                                      resume_dir=args.resume_dir)
    else:  # data-parallel: the first process lends the others each layer's weights (parallel.lent), who load none
        model, tokenizer, source = load_model(args.model, _dtype(args), skeleton=parallel.rank() > 0)
        result = api.prune(model, config, calib, tokenizer, model_source=source, resume_dir=args.resume_dir)
        if parallel.rank() == 0:  # every process holds the same pruned model: the first saves it
            checkpoint.save_checkpoint(model, tokenizer, out, result.report, args.overwrite)
    if parallel.rank() != 0:
        return
    args._saved = out  # a Ctrl-C from here on comes after the result is safe
    if args.resume_dir:
        ResumeStore(args.resume_dir).clear()
    print(report.layer_table(result.layers))
    ignored = f" ({result.report['decoder_sparsity']:.4f} of all decoder linears, --ignore'd ones dense)" \
        if config.ignore else ""
    print(f"\n{config.method} {config.sparsity}: sparsity {result.report['overall_sparsity']:.4f} of the pruned "
          f"linears{ignored}, {result.seconds:.1f} s, memory {result.report['memory']}; saved to {out}")


def _plan_text(plan, source, streamed=False):
    """A prune's plan (api.plan) for people; streamed: with --stream-weights."""
    size = memory.describe
    held = (f"read from the checkpoint a layer at a time (--stream-weights): the host holds at most "
            f"{size(max(plan['before_layers_bytes'], plan['largest_layer_bytes']))} of them at once (the embeddings "
            f"for the capture, then each layer)" if streamed else f"in host memory{_beyond(plan)}")
    lines = [f"dry run, nothing pruned or saved: {plan['method']} {plan['sparsity']} of {source}",
             f"  {plan['layers']} decoder layers; {plan['linears_pruned']} linears to prune, "
             f"{plan['linears_kept_dense']} kept dense (--ignore)",
             f"  model weights: {size(plan['weights_bytes'])} ({plan['dtype'].removeprefix('torch.')}) {held}; each "
             f"layer in turn on {plan['device']}, the largest {size(plan['largest_layer_bytes'])}"]
    if plan["calibration"]:
        calib = plan["calibration"]
        lines += [f"  a layer's statistics (float32): up to {size(plan['layer_statistics_bytes'])} on "
                  f"{plan['device']}",
                  f"  calibration activations: {size(plan['activations_bytes'])} on {plan['activations_on']} "
                  f"({calib['nsamples']} windows x {calib['seqlen']} tokens of {calib['dataset']})"]
    lines.append("  plus the method's own working memory, not estimated here (measured ones: README, Speed)")
    return "\n".join(lines)


def _beyond(plan):
    """Where the weights alone exceed the host memory available now: said, with what lowers it."""
    free = plan["host_available_bytes"]
    if free is None or plan["weights_bytes"] <= free:
        return ""
    halves = "; --dtype bfloat16 or float16 halves them" if plan["dtype"] == "torch.float32" else ""
    return f" (MORE than the {memory.describe(free)} available here: the load would fail{halves})"


def _finished_progress(args):
    """Where --out is taken and --resume-dir holds a run with every layer done: a run stopped after saving its
    checkpoint and before removing its progress leaves both, and the same command run again stopped at --out
    without a word on the progress (a model's worth of files) left behind."""
    done = ResumeStore(args.resume_dir).finished() if args.resume_dir else None
    if done is None:
        return ""
    return (f"; --resume-dir {args.resume_dir} holds a run with all {done} layers done, as a run stopped after "
            f"saving its checkpoint leaves it: if {args.out} is that checkpoint, delete {args.resume_dir}; with "
            "--overwrite the run saves its result again from it")


def _refuse_out_over_inputs(args, done, calib=None):
    """--out must not be, or hold, what the run reads: the model's directory (the embedded default's too: its
    package), the calibration file or the data directory: the save would replace them."""
    out = Path(args.out).expanduser().resolve()
    model = _model_path(args)
    inputs = [(f"the model being {done} ({args.model or model})", model)]
    if calib is not None:
        if calib.dataset.endswith((".txt", ".jsonl")):
            inputs.append(("the calibration file", Path(calib.dataset)))
        with contextlib.suppress(FileNotFoundError):  # a missing one is named by check_calibration_source
            inputs.append(("the data directory", resolve_data_dir(calib.data_dir)))
    for name, path in inputs:
        path = path and path.expanduser().resolve()
        if path is not None and files.within(path, out):
            raise ValueError(f"--out {args.out} would replace {name}: write elsewhere")


def _model_path(args):
    """The model's file or directory (a hub id's path exists nowhere: harmless), None without the embedded one."""
    try:
        return Path(args.model) if args.model else default_gguf()
    except FileNotFoundError:
        return None


def _warn_unused_calibration(args):
    """A method that reads no data (magnitude) ignores the calibration flags: say so rather than let the
    user believe --nsamples or --calib shaped the result."""
    passed = [_flag(f.name) if f.name != "dataset" else "--calib"
              for f in dataclasses.fields(CalibrationConfig) if getattr(args, f.name, None) is not None]
    passed += [flag for flag, value in (("--sequential", args.sequential), ("--resume-dir", args.resume_dir))
               if value is not None]  # no data: nothing to feed forward, and one pass with nothing to resume
    if passed:
        print(f"sdsengine: --method {args.method} uses no calibration data; ignoring {' '.join(passed)}",
              file=sys.stderr)


def _note_unused_gpu(device):
    """--device defaults to cpu (the recorded runs' device); say so where a GPU sits idle."""
    if torch.device(device).type == "cpu" and torch.cuda.is_available():
        print("sdsengine: a GPU is visible but this runs on the CPU; --device cuda runs it there", file=sys.stderr)


def cmd_eval(args):
    tasks = task_list(args.tasks)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of inputs, got {args.batch_size}")
    if args.stream_weights and args.batch_size not in (None, 1):
        raise ValueError(f"--stream-weights runs each zero-shot input alone (--batch-size 1), so --batch-size "
                         f"{args.batch_size} cannot apply: drop it, or drop --stream-weights to load the model whole")
    if args.samples and all(t in EVAL_TASKS for t in tasks):
        raise ValueError(f"--samples records zero-shot answers, and none of the tasks {args.tasks!r} is zero-shot")
    _check_result_files(args, tasks)
    check_device(args.device)
    _note_unused_gpu(args.device)
    # A bad task name, file, window or limit fails before the model load (minutes for a 7B).
    check_perplexity(tasks, args.seqlen, args.limit, args.data_dir)
    items = load_zeroshot(tasks, args.data_dir, args.limit)
    if args.lean and not (args.model and is_compressed_checkpoint(args.model)):
        raise ValueError(f"--lean applies to a compressed checkpoint (written by sdsengine convert), and "
                         f"{args.model or 'the embedded model'} is not one")
    samples = {} if args.samples else None
    if args.stream_weights:
        source = args.model or str(default_gguf())
        results = evaluate_checkpoint(source, tasks, seqlen=args.seqlen, limit=args.limit, data_dir=args.data_dir,
                                      device=args.device, dtype=_dtype(args), samples=samples, items=items)
    else:
        model, tokenizer, source = load_model(args.model, _dtype(args), compressed_ok=True, device=args.device,
                                              any_layout=True)
        if args.lean:
            set_lean(model)
        model.to(args.device)  # a no-op where load_model loaded it there
        results = evaluate(model, tokenizer, tasks, seqlen=args.seqlen, limit=args.limit, data_dir=args.data_dir,
                           device=args.device, samples=samples, items=items, batch_size=args.batch_size or BATCH_SIZE)
    print(results_table({source: results}))
    if args.json:
        payload = {"model": source, "versions": report.versions(), "results": results}
        files.write_whole(args.json, json.dumps(payload, indent=2))
    if args.samples:
        lines = [json.dumps({"task": task, **record}) for task, records in samples.items() for record in records]
        files.write_whole(args.samples, "".join(line + "\n" for line in lines))


def _check_result_files(args, tasks):
    """Before any model time: --json and --samples name two new (or, with --overwrite, replaceable) files in
    writable directories, neither a task file nor inside the model."""
    named = [(flag, path) for flag, path in (("--json", args.json), ("--samples", args.samples)) if path]
    if len(named) == 2 and Path(args.json).expanduser().resolve() == Path(args.samples).expanduser().resolve():
        raise ValueError(f"--json and --samples name the same file {Path(args.json).expanduser().resolve()}")
    reads = [Path(t) for t in tasks] + [p for p in [_model_path(args)] if p is not None]  # a task name: no such path
    for flag, path in named:
        files.check_new_file(flag, path, args.overwrite, reads)


def cmd_convert(args):
    _refuse_out_over_inputs(args, "converted")
    out = checkpoint.check_output_dir(args.out, args.overwrite)  # before the load and conversion (minutes)
    model, tokenizer, source = load_model(args.model, _dtype(args) or "auto", needs_tokenizer=False,
                                          skeleton=args.stream_weights)
    model = _half_for_kernels(model, args)
    ignore = ("lm_head", *_listed(args.ignore))
    with warnings.catch_warnings():  # convert's: said above (_half_for_kernels) and below, with the remedies
        warnings.simplefilter("ignore")
        if args.stream_weights:  # its weights read a linear at a time, written to --out as they come
            records = write_converted(model, source, out, tokenizer, ignore, args.overwrite, args.pack_experts)
            share = 0
        else:
            records, share = _convert_loaded(model, source, out, tokenizer, ignore, args)
    done = sum(r.action == "converted" for r in records)
    print(f"{source}: {done} of {len(records)} linears converted to SparseLinear; saved to {args.out}")
    if share:
        why = "none of their linears was converted: ignored, or not 2:4" if args.pack_experts else (
            "--pack-experts packs them: less memory; its speed is not measured on a GPU yet")
        print(f"{source}: experts' fused weights, {share:.0%} of the model's, stay dense in it ({why})")


def _convert_loaded(model, source, out, tokenizer, ignore, args):
    """(records, the share of the model's weights left in fused expert banks) of the loaded model converted and
    saved to out."""
    records, total = [], weight_count(model)  # before convert frees a packed mixture's banks
    convert(model, ignore=ignore, report=records, pack_experts=args.pack_experts)
    check_some_converted(records, source)
    save_compressed(model, out, tokenizer, args.overwrite)
    return records, fused_bank_share(model, total)


def _half_for_kernels(model, args):
    """The sparse kernels run fp16/bf16 only: without --dtype, a float32 checkpoint (as prune saves by
    default) is converted in bfloat16, which keeps float32's range; with --dtype float32, say what it costs."""
    if model.dtype in (torch.float16, torch.bfloat16):
        return model
    if args.dtype is None:
        print(f"convert: the checkpoint is {str(model.dtype).removeprefix('torch.')}; converting in bfloat16, "
              "where the sparse kernels run (--dtype float16 or float32 to choose)")
        return transformers_compat.cast(model, torch.bfloat16)  # what transformers keeps in float32 stays
    print("convert: warning: float32 SparseLinears always run the dense fallback (the sparse kernels need "
          "float16 or bfloat16)", file=sys.stderr)
    return model


def cmd_bench(args):
    return bench.run(args, load_model=lambda name: load_model(name, torch.float16))


def cmd_demo(args):
    """Dense vs 2:4 on the embedded model, with a reduced protocol so it fits in minutes on a laptop."""
    start = time.perf_counter()
    check_device(args.device)
    config = lookup(args.method)[0](sparsity="2:4", device=args.device)  # bad flags named before any work
    calib = CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen, data_dir=args.data_dir)
    if args.limit < 0:
        raise ValueError(f"--limit must be 0 (the whole test set) or positive, got {args.limit}")
    limit = args.limit or None
    check_calibration_source(calib)
    check_perplexity(["wikitext2"], args.seqlen, limit, args.data_dir)
    model, tokenizer, source = load_model(None)
    model.to(args.device)  # evaluated and pruned there (a pruned layer goes back where it was)
    print(f"sdsengine demo: {source}\nREDUCED PROTOCOL: calibration {args.nsamples} x {args.seqlen} C4 tokens, "
          f"WikiText-2 test at seqlen {args.seqlen}, {'all' if limit is None else f'first {limit}'} windows "
          "(the README's table uses 128 x 2048 and the whole test set)")
    eval_kwargs = dict(seqlen=args.seqlen, limit=limit, data_dir=args.data_dir, device=args.device)
    rows = {"dense": evaluate(model, tokenizer, ["wikitext2"], **eval_kwargs)}
    result = api.prune(model, config, calib, tokenizer, model_source=source)
    label = f"{args.method} 2:4 (sparsity {result.report['overall_sparsity']:.3f}, {result.seconds:.0f} s)"
    rows[label] = evaluate(model, tokenizer, ["wikitext2"], **eval_kwargs)
    print(results_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args._config_flags = {f.name for c in [PruneConfig, CalibrationConfig] + [c for c, _ in METHODS.values()]
                          for f in dataclasses.fields(c)}
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        commands = {"prune": cmd_prune, "eval": cmd_eval, "convert": cmd_convert, "bench": cmd_bench, "demo": cmd_demo}
        return commands[args.command](args) or 0
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: missing files, full or read-only disks
        print(f"sdsengine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback (an output is written whole or not at all)
        print(f"sdsengine: interrupted{_what_interrupted_left(args)}", file=sys.stderr)
        return 130


def _what_interrupted_left(args):
    """What a prune stopped by Ctrl-C leaves: its finished layers in --resume-dir, or, once its checkpoint is
    saved, that checkpoint and progress no longer needed."""
    progress, saved = getattr(args, "resume_dir", None), getattr(args, "_saved", None)
    if saved is not None:
        left = (f"; {progress} (--resume-dir) is no longer needed: delete it"
                if progress and Path(progress).expanduser().exists() else "")
        return f" after the checkpoint was saved to {saved}{left}"
    return f"; finished layers are kept in {progress} (--resume-dir)" if progress else ""


if __name__ == "__main__":
    sys.exit(main())
