"""Prune, then convert: swap the 2:4 linears of a pruned model for SparseLinear, and save/load the result.

`convert` leaves a layer dense when it is ignored, not 2:4, or has in_features % 32 != 0, and says so.
transformers' GPT-2 Conv1D keeps its weight as (in, out); it is transposed to nn.Linear's (out, in).
A mixture's fused experts (3-D banks, which no linear holds) stay as they are unless asked (pack_experts): then
each becomes an UnfusedExperts (pipeline/experts.py) whose experts' linears are converted like any other; where
at least one of them converts, the module stays unfused in the converted model, else the fused module stays.
Where every expert linear of a module converts, it gets a grouped path (nn/grouped.py): at decode and short
prefills on a GPU, each projection of all experts in one launch, routing read on the device; elsewhere its experts
run one at a time, with a host sync per call for the routing. Not by default: past the grouped path's regime that
is slower than dense (README, Mixtures of experts), and no layer is to be slower than dense. What packing surely
saves is memory: the experts are most of a mixture's weights.

A compressed checkpoint is a directory holding sdsengine_compressed.safetensors (the state dict:
values/meta/bias buffers for every SparseLinear, tied tensors stored once; named so that transformers'
from_pretrained finds no weights there rather than random ones), sdsengine_compressed.json naming the
SparseLinear modules, their shapes and the model's dtype, and the experts modules unfused; the model's
config.json and generation_config.json when it has them, and the tokenizer's files when one is given (so `sdsengine eval
--model DIR` runs it). It is written as the pruned checkpoint is (checkpoint.staged_directory); a
non-empty directory is replaced only with overwrite. Convert the whole model: its save_pretrained is what
refuses (a submodule converted alone leaves the outer model's save_pretrained as it was).
"""
import fnmatch
import json
import logging
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from sdsengine import transformers_compat
from sdsengine.checkpoint import check_output_dir, staged_directory
from sdsengine.config import ignore_patterns
from sdsengine.kernels import check_meta
from sdsengine.masks import nm_violations
from sdsengine.nn.grouped import GroupedBanks
from sdsengine.nn.sparse_linear import SparseLinear
from sdsengine.pipeline import experts

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency; keep nn importable without it
    class Conv1D:  # nothing is an instance of it
        pass

MANIFEST = "sdsengine_compressed.json"
# not model.safetensors: transformers' from_pretrained would take the directory for a dense checkpoint and
# fill every compressed linear with random weights, with no error; so it finds no weights file and says so
WEIGHTS = "sdsengine_compressed.safetensors"
LEGACY_WEIGHTS = "model.safetensors"  # checkpoints written before 2026-12-02
FORMAT = "sdsengine-2:4-compressed"
# 1: SparseLinears only; 2: also a mixture's experts modules unfused ("unfused_experts"), which a reader of 1 cannot
# build (sdsengine before 2026-12-02 does not check the version: it fails on the first expert's name)
VERSIONS = (1, 2)

log = logging.getLogger("sdsengine")


@dataclass
class Conversion:
    name: str
    shape: tuple  # (out_features, in_features)
    action: str  # "converted" or "skipped"
    reason: str = ""


def convert(model, ignore=("lm_head",), report=None, pack_experts=False):
    """Replace every 2:4 nn.Linear / Conv1D of `model` with SparseLinear, in place; returns the model, for
    inference (SparseLinear's weights are frozen buffers), saved with save_compressed (its save_pretrained
    refuses: transformers would load that checkpoint with random weights).

    ignore: fnmatch patterns matched against a module's full name or its last name component.
    report: a list to receive one Conversion per linear layer; a summary is logged either way.
    pack_experts: a mixture's experts too, one SparseLinear per expert and projection (module docstring: less
    memory, speed against the fused banks not measured on a GPU yet); by default their fused banks stay dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes a model (an nn.Module), got {type(model).__name__}")
    if pack_experts and experts.is_fused_experts(model):  # it would have to replace itself
        raise ValueError(f"convert packs a {type(model).__name__} inside the model that holds it: convert the whole "
                         "model (or the layer holding these experts)")
    records = [] if report is None else report
    ignore = ignore_patterns(ignore)
    already = sum(isinstance(m, SparseLinear) for m in model.modules())  # converted before: no warning for them
    total = weight_count(model)  # before packing
    done = {}  # id(module) -> its replacement: a module registered under two names is replaced under both
    # each fused experts module as per-expert linears viewing its banks (no copy), converted with the rest
    unfused = {name: experts.for_inference(m) for name, m in model.named_modules()
               if pack_experts and experts.is_fused_experts(m)}
    named = list(model.named_modules(remove_duplicate=False)) + [
        (f"{owner}.{name}", m) for owner, module in unfused.items() for name, m in module.named_modules() if name]
    # Every replacement is made before any is put in place: a failure (a layer offloaded to the meta device,
    # Ctrl-C) leaves the model as it was, not half converted with transformers' save_pretrained, which would
    # save the converted linears' weights where from_pretrained cannot find them.
    for name, module in linears_of(named).items():
        record, done[id(module)] = convert_linear(name, module, ignore)
        records.append(record)
    packed = {name: m for name, m in unfused.items() if any(done.get(id(sub)) is not None for sub in m.modules())}
    for name, module in packed.items():  # before the linears inside, whose names pass through it
        set_submodule(model, name, module)
    for name, module in named:
        if done.get(id(module)) is not None:
            set_submodule(model, name, done[id(module)])
    for module in packed.values():
        _settle(module)
    log_summary(records, already)
    share = fused_bank_share(model, total)
    if share:
        log.info("  kept dense: a mixture's fused experts, %.0f%% of the model's weights (%s)", 100 * share,
                 "none of their linears converts" if pack_experts else "pack_experts=True packs them")
    if already or any(m is not None for m in done.values()):
        _refuse_save_pretrained(model)
    warn_float32(done.values(), "convert model.to(torch.bfloat16) or .half() instead")
    return model


def warn_float32(layers, remedy):
    """Warn where a SparseLinear among `layers` (None: a linear left dense) holds float32, prune's default dtype."""
    if any(m is not None and m.values.dtype == torch.float32 for m in layers):
        warnings.warn("sdsengine.convert: float32 SparseLinears always run the dense fallback (the sparse kernels "
                      f"need float16 or bfloat16): {remedy}")


def fused_banks(model) -> dict[str, nn.Parameter]:
    """The model's parameters of three or more dimensions outside convolutions, by name: a mixture's fused expert
    banks (experts, out, in). A convolution's kernel is 3-D too (Mamba's conv1d), and is no bank."""
    return {f"{owner}.{name}" if owner else name: p for owner, module in model.named_modules()
            if not isinstance(module, nn.modules.conv._ConvNd)
            for name, p in module.named_parameters(recurse=False) if p.dim() >= 3}


def weight_count(model) -> int:
    """The model's weights: its parameters, and a SparseLinear's as the dense ones it holds compressed (buffers)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, SparseLinear))


def fused_bank_share(model, total=None) -> float:
    """The share of `total` weights (default: weight_count) held in fused expert banks, which run dense: convert
    leaves them unless asked to pack them. Pass the total counted before convert, which frees packed banks."""
    banks = sum(p.numel() for p in fused_banks(model).values())
    return banks / max(weight_count(model) if total is None else total, 1)


def linears_of(named) -> dict:
    """name -> module of each linear (nn.Linear, GPT-2's Conv1D) among (name, module) pairs, under its first name: a
    module registered under two names is converted once."""
    found, seen = {}, set()
    for name, module in named:
        if isinstance(module, (nn.Linear, Conv1D)) and id(module) not in seen:
            found[name] = module
            seen.add(id(module))
    return found


def linear_shape(module) -> tuple:
    """(out_features, in_features) of a linear: GPT-2's Conv1D holds its weight as (in, out)."""
    shape = tuple(module.weight.shape)
    return shape[::-1] if isinstance(module, Conv1D) else shape


def convert_linear(name, module, ignore):
    """(Conversion, its SparseLinear or None where it stays dense) of the linear `module` named `name`."""
    weight = module.weight.detach()
    weight = weight.T if isinstance(module, Conv1D) else weight
    shape = linear_shape(module)
    in_features = shape[1]
    if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], p) for p in ignore):
        return Conversion(name, shape, "skipped", "ignored"), None
    if in_features % 32:
        return Conversion(name, shape, "skipped", f"in_features {in_features} not divisible by 32"), None
    violations = nm_violations(weight, 2, 4)
    if violations:
        return Conversion(name, shape, "skipped", f"not 2:4 ({violations} groups with more than 2 nonzeros)"), None
    return Conversion(name, shape, "converted"), SparseLinear.from_dense(weight, module.bias)


def set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _refuse_save_pretrained(model):
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _save_pretrained_refused  # this instance only; save_compressed saves it


def _save_pretrained_refused(*args, **kwargs):
    """A converted model's save_pretrained: its checkpoint would hold compressed tensors under names that
    from_pretrained does not know, and load as random weights without an error."""
    raise TypeError("a model converted to SparseLinear is saved with sdsengine.save_compressed(model, directory, "
                    "tokenizer) and loaded with sdsengine.load_compressed; save_pretrained would write a checkpoint "
                    "that transformers loads with random weights in place of every compressed linear")


def log_summary(records, already=0):
    done = [r for r in records if r.action == "converted"]
    log.info("sdsengine.convert: %d of %d linear layers converted to SparseLinear", len(done), len(records))
    kept = {}  # a mixture's experts once per projection and reason, not once per expert (128 in some)
    for r in records:
        if r.action != "converted":
            kept.setdefault((experts.role(r.name), r.shape, r.reason), []).append(r)
    for (name, shape, reason), group in kept.items():
        log.info("  kept dense: %s %s: %s%s", name, shape, reason, f" ({len(group)} experts)" if len(group) > 1 else "")
    if records and not done and not already:  # the usual cause: a model pruned unstructured, or not pruned at all
        warnings.warn(f"sdsengine.convert: none of the {len(records)} linear layers is converted "
                      f"({skip_reasons(records)}); SparseLinear needs 2:4 weights")


def check_some_converted(records, source):
    """A copy with nothing compressed is neither smaller nor faster: refuse it, saying why (before anything is kept)."""
    if not any(r.action == "converted" for r in records):
        raise ValueError(f"{source}: none of its {len(records)} linears can be converted ({skip_reasons(records)}); "
                         "SparseLinear needs 2:4 weights: prune with --sparsity 2:4 first. Nothing was written")


def skip_reasons(records):
    """Why linears stayed dense, each reason once: 'ignored; not 2:4'."""
    return "; ".join(sorted({r.reason.split(" (")[0] for r in records if r.action != "converted"}))


# ---------------------------------------------------------------------------------------------------
# Compressed checkpoints
# ---------------------------------------------------------------------------------------------------

def save_compressed(model, directory, tokenizer=None, overwrite=False):
    """Write `model` (after convert), and its tokenizer if given, to a new or empty `directory` (or replace a
    non-empty one with overwrite); returns its path."""
    out = check_output_dir(directory, overwrite)
    with staged_directory(out, overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        write_beside(model, tmp, tokenizer)
    return out


def write_beside(model, directory, tokenizer=None):
    """What a compressed checkpoint holds besides its weights file, into `directory`: the model's configs, the
    tokenizer's files if given, the manifest (of the model after convert, or a skeleton holding empty SparseLinears
    where the file has compressed ones)."""
    for part in ("config", "generation_config"):  # generation_config: the sampling defaults
        if hasattr(getattr(model, part, None), "save_pretrained"):
            getattr(model, part).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / MANIFEST).write_text(json.dumps(_manifest(model), indent=2))


def _manifest(model):
    sparse = {name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                     "dtype": str(m.values.dtype).removeprefix("torch.")}
              for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    unfused = [name for name, m in model.named_modules() if isinstance(m, experts.UnfusedExperts)]
    return {"format": FORMAT, "version": 2 if unfused else 1, "pattern": "2:4", "sparse_modules": sparse,
            **({"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}),
            **({"unfused_experts": unfused} if unfused else {})}


def is_compressed_checkpoint(path):
    """Whether `path` is a directory written by save_compressed (it holds the manifest)."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def load_compressed(directory, model=None, dtype=None, device=None):
    """Load a checkpoint written by save_compressed onto `device` (default: the skeleton's, else the CPU):
    the file's tensors are read straight there.

    model: a skeleton of the same architecture (dense linears are fine: the listed ones are replaced; a load
    that fails leaves it as it was);
    without it the model is built from the saved config.json with transformers, its parameters on the meta
    device, so that the checkpoint's tensors are the only weights ever allocated: peak memory is the
    compressed model's, not the dense one's. dtype: of the checkpoint's floating tensors (default: as
    saved); buffers the model makes itself, such as rotary frequencies, stay as transformers builds them in
    that dtype (a cast of the whole model would round them too, and change its outputs).
    """
    directory = Path(directory).expanduser()
    manifest = _read_manifest(directory)
    unfused = manifest.get("unfused_experts", [])
    weights = next((directory / name for name in (WEIGHTS, LEGACY_WEIGHTS) if (directory / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"compressed checkpoint {directory} has no {WEIGHTS}")
    shells = {name: _shell(directory, name, spec) for name, spec in manifest["sparse_modules"].items()}
    if dtype is None:  # the model's; manifests written before it was recorded: the first sparse layer's
        dtype = _dtype_named(manifest["dtype"], directory / MANIFEST) if "dtype" in manifest else (
            next(iter(shells.values())).values.dtype if shells else torch.float32)
    undo = (lambda: None) if model is None else _undo_for(model, [*unfused, *shells])
    model = _model_from_config(directory, dtype) if model is None else model
    device = _home(model) if device is None else torch.device(device)
    try:
        unfused = [_unfuse(model, name) for name in unfused]  # before the shells: their names pass through it
        for name, shell in shells.items():
            set_submodule(model, name, shell)
        _load_weights(model, weights, device, dtype)
    except Exception as exc:  # safetensors' own errors, a module the model lacks, a missing or extra tensor
        undo()
        raise ValueError(f"compressed checkpoint {directory} does not load: {exc}") from exc
    try:  # before settle empties the skeleton's fused banks: a damaged layout leaves the caller's model as it was
        for name, shell in shells.items():
            check_meta(shell.meta, f"compressed checkpoint {directory}, {name}")
    except Exception:
        undo()
        raise
    for module in unfused:  # loaded: the fused banks (the skeleton's) are no longer needed
        _settle(module)
    model.to(device)  # the buffers the model made itself (rotary frequencies)
    _refuse_save_pretrained(model)
    return model.eval()


def _read_manifest(directory):
    """The checkpoint's manifest, checked: a clear error for a directory that holds none, a damaged one, or one
    written by a newer sdsengine."""
    if not is_compressed_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not an sdsengine compressed checkpoint (no {MANIFEST}; "
                                "`sdsengine convert` writes one)")
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is damaged (not valid JSON: {exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("sparse_modules"), dict):
        raise ValueError(f"{path} is not an sdsengine compressed checkpoint manifest")
    if type(manifest.get("version", 1)) is not int or manifest.get("version", 1) not in VERSIONS:  # true == 1
        raise ValueError(f"{path}: format version {manifest.get('version')!r} is none this sdsengine reads "
                         f"({' and '.join(map(str, VERSIONS))}): a newer sdsengine wrote it (upgrade to load it), or "
                         "the manifest is damaged")
    unfused = manifest.get("unfused_experts", [])
    if not isinstance(unfused, list) or not all(isinstance(name, str) for name in unfused):
        raise ValueError(f"{path}: 'unfused_experts' is damaged (not a list of module names)")
    return manifest


def _settle(unfused):
    """A packed UnfusedExperts in the model for good: its banks freed (experts.settle), and where every expert linear
    converted, its grouped path for decode (grouped.py)."""
    experts.settle(unfused)
    unfused.grouped = GroupedBanks.of(unfused)


def _unfuse(model, name):
    """The skeleton's fused experts module `name` as the UnfusedExperts the checkpoint holds, put in its place (one
    that is unfused already, by an earlier load or convert, takes the checkpoint's linears as it is)."""
    fused = model.get_submodule(name)
    if isinstance(fused, experts.UnfusedExperts):
        return fused
    if not experts.is_fused_experts(fused):
        raise ValueError(f"the checkpoint holds {name} as a mixture's experts, unfused; the model has a "
                         f"{type(fused).__name__} there, not transformers' fused experts")
    unfused = experts.for_inference(fused)
    set_submodule(model, name, unfused)
    return unfused


def _undo_for(model, names):
    """A function that puts back the skeleton's modules under `names` and its tensors as they are now: a
    model the caller passed comes back unchanged from a load that fails (load_state_dict assigns every
    tensor it matched before its strict check refuses, which left a working hybrid of two models)."""
    modules = {}
    for name in names:
        with suppress(AttributeError):  # a module the skeleton lacks: the load names it
            modules[name] = model.get_submodule(name)
    tensors = model.state_dict(keep_vars=True)

    def undo():
        for name, module in modules.items():
            set_submodule(model, name, module)
        model.load_state_dict(tensors, strict=False, assign=True)
    return undo


def _home(model):
    """Where the skeleton's real tensors are (the CPU for one wholly on the meta device)."""
    devices = [t.device for t in (*model.parameters(), *model.buffers()) if not t.is_meta]
    return devices[0] if devices else torch.device("cpu")


def _load_weights(model, path, device, dtype):
    """The file's tensors become the model's: assigned, not copied into preallocated ones (so meta parameters
    are fine), floating ones in dtype, the others (the int32 metadata) in the dtype the model holds.

    save_model stores a tensor that several names share (tied embeddings and head) once, under one of them:
    it goes to every name that shares it in the skeleton, and the sharing is restored after assignment
    (which gives each name its own tensor). A file with two different tensors for one shared is refused.
    """
    if hasattr(model, "tie_weights"):  # a skeleton built under accelerate's init_empty_weights comes untied
        model.tie_weights()
    held = model.state_dict(keep_vars=True)  # every name, shared tensors under each of theirs
    dtypes = _dtypes(model, dtype)
    state = {name: _as_held(name, t, held.get(name), dtypes) for name, t in load_file(path, device=str(device)).items()}
    shared = {}
    for name, tensor in held.items():
        shared.setdefault(id(tensor), []).append(name)
    shared = [names for names in shared.values() if len(names) > 1]
    for names in shared:
        stored = [n for n in names if n in state]
        for other in stored[1:]:
            if not torch.equal(state[other], state[stored[0]]):
                raise ValueError(f"{stored[0]} and {other} are one tensor in the model (tied) but differ in the file")
        if stored:
            state.update({n: state[stored[0]] for n in names})
    model.load_state_dict(state, strict=True, assign=True)
    for first, *others in shared:
        for name in others:
            set_submodule(model, name, _tensor_at(model, first))
    empty = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if empty:
        raise ValueError(f"no tensor for {', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}")


def _dtypes(model, dtype):
    """A float tensor's dtype by its name: dtype, or float32 where transformers holds it so (router weights)."""
    keep = transformers_compat.float32_names(model, dtype)
    return lambda name: torch.float32 if name in keep else dtype


def _as_held(name, tensor, held, dtypes):
    """The file's tensor in the dtype the model takes: a float one in dtypes(name), another in the held one's."""
    if held is None:  # not the model's: load_state_dict names it
        return tensor
    if tensor.is_floating_point() != held.is_floating_point():
        raise ValueError(f"{name} is stored as {tensor.dtype}, but the model holds {held.dtype}")
    return tensor.to(dtypes(name) if tensor.is_floating_point() else held.dtype)


def _tensor_at(model, name):
    parent, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(parent) if parent else model, leaf)


def _shell(directory, name, spec):
    """An empty SparseLinear for a manifest entry (on the meta device: the file's tensors become its
    buffers), or a ValueError naming the entry."""
    try:
        dtype = _dtype_named(spec["dtype"], directory / MANIFEST)
        return SparseLinear(spec["in_features"], spec["out_features"], spec["bias"], device="meta", dtype=dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{directory / MANIFEST}: entry {name!r} is damaged ({type(exc).__name__}: {exc})") from None


def _dtype_named(name, where):
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: {name!r} is not a torch dtype")
    return dtype


def _model_from_config(directory, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:
        raise ValueError(f"compressed checkpoint {directory} has no usable config.json: {exc}") from exc
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **transformers_compat.dtype_kwargs(dtype))
    if (directory / "generation_config.json").is_file():  # from_config does not read it; from_pretrained does
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


@contextmanager
def parameters_on_meta():
    """Parameters registered inside go to the meta device: no memory, and their initialisation costs
    nothing. Buffers stay where they are made: rotary frequencies and the like are computed at
    construction and are not in a checkpoint. (It patches nn.Module for the while: modules another thread
    builds meanwhile get meta parameters too, as under accelerate's init_empty_weights.)"""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
