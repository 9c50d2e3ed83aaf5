"""A pruned checkpoint converted from its files a linear at a time (`sdsengine convert --stream-weights`,
sdsengine.convert_checkpoint): what save_compressed writes for convert(the loaded model), while the host holds one
linear's weight at a time, so a checkpoint larger than the host's memory converts.

The model is a skeleton (models.skeleton: its parameters on the meta device). Each linear's weight is read from the
safetensors files when its turn comes (pipeline/streaming.py's WeightStream) and converted by convert's own rule; its
tensors, compressed or dense, go straight into the compressed checkpoint's one file, whose header is written
last (tensorfiles.SafetensorsWriter). Every other tensor of the model follows in its state dict's order, one at a
time, a tied one once: a mixture's fused experts banks too (built as transformers builds them on load from experts
stored one by one), which convert leaves dense and fused. With pack_experts (--pack-experts), each experts module is
lent at once, its linears slices of its banks, and converted as convert(pack_experts=True) converts it. Refused as a
streamed prune refuses: names or shapes that are not the model's, GGUF, `.bin` weights.
"""
import torch

from sdsengine.checkpoint import check_output_dir, staged_directory
from sdsengine.config import ignore_patterns
from sdsengine.nn.convert import (WEIGHTS, Conversion, check_some_converted, convert_linear, linear_shape, linears_of,
                                  log_summary, set_submodule, warn_float32, write_beside)
from sdsengine import tensorfiles
from sdsengine.nn.sparse_linear import SparseLinear
from sdsengine.pipeline import experts


def convert_checkpoint(model, out, ignore=("lm_head",), dtype=None, overwrite=False, pack_experts=False
                       ) -> list[Conversion]:
    """save_compressed(convert(load_model(model, dtype), pack_experts=pack_experts), out, its tokenizer), read from the
    files of `model` (a safetensors checkpoint directory or a hub id) a linear (or a packed experts module) at a time.
    dtype: of the compressed model (default: the checkpoint's; the sparse kernels run float16 and bfloat16). Returns
    one Conversion per linear; `out` is written whole or not at all (replaced with overwrite), and not when no linear
    converts."""
    from sdsengine.models import load_model
    out = check_output_dir(out, overwrite)  # before any work
    model, tokenizer, source = load_model(model, dtype or "auto", needs_tokenizer=False, skeleton=True)
    return write_converted(model, source, out, tokenizer, ignore, overwrite, pack_experts)


def write_converted(model, source, out, tokenizer=None, ignore=("lm_head",), overwrite=False, pack_experts=False
                    ) -> list[Conversion]:
    """convert_checkpoint of the skeleton `model` (in the dtype to convert in) of `source` (load_model's)."""
    from sdsengine.models import weights_directory
    from sdsengine.pipeline import streaming  # it imports nn (through the pipeline): not at the top
    ignore = ignore_patterns(ignore)
    files = streaming.checkpoint_files(weights_directory(source))
    stream = streaming.WeightStream(model, files, every=True)  # every name checked before a byte is written
    packed = _unfused(model) if pack_experts else {}
    named = list(model.named_modules(remove_duplicate=False))
    linears = linears_of(named)
    first = {id(m): name for name, m in linears.items()}
    owner = {f"{name}.{leaf}": first[id(m)] for name, m in named if id(m) in first for leaf in m.state_dict()}
    members = {prefix: [n for n in linears if n.startswith(prefix + ".")] for prefix in packed}  # lent together
    packed_in = {linear: prefix for prefix, names in members.items() for linear in names}
    state = model.state_dict(keep_vars=True)  # a packed experts module's linears where its banks were
    records, shells = {}, {}
    with staged_directory(out, overwrite) as staged:
        room = tensorfiles.header_room(_candidates(stream, state, linears))
        with tensorfiles.SafetensorsWriter(staged / WEIGHTS, room) as file:
            written = set()  # the checkpoint's tensors written dense: a tied embedding and head once
            for name in state:
                if name not in owner:
                    _write_once(file, name, stream.read(name), stream.keys.get(name, name), written)
                elif (linear := owner[name]) not in records:
                    prefix = packed_in.get(linear)  # a packed experts module's linears go with it: its banks read once
                    lend, together = (packed[prefix], members[prefix]) if prefix else (linears[linear], [linear])
                    converted = _convert(stream, lend, together, linears, ignore, file, written)
                    for done, (record, shell) in converted.items():
                        records[done], shells[done] = record, shell
        for name, module in packed.items():  # none of its linears converted: it stays fused, as convert leaves it
            if all(shells[linear] is None for linear in members[name]):
                set_submodule(model, name, module.fused)
        # convert's order: a packed module's linears after the model's
        records = [records[n] for n in linears if n not in packed_in] + [records[n] for n in packed_in]
        check_some_converted(records, source)  # out not written
        for name, module in named:  # the manifest names the converted linears, as it does after convert
            if shells.get(first.get(id(module))) is not None:
                set_submodule(model, name, shells[first[id(module)]])
        write_beside(model, staged, tokenizer)
    log_summary(records)
    warn_float32(shells.values(), "pass dtype=torch.bfloat16 (or `sdsengine convert`, which does)")
    return records


def _write_once(file, name, tensor, key, written):
    """tensor under name, unless the checkpoint's tensor `key` is in the file already (under a tied name)."""
    if key not in written:
        file.add(name, tensor)
        written.add(key)


def _unfused(model) -> dict:
    """{name: UnfusedExperts} of the skeleton's fused experts modules, each put in its place as convert(pack_experts)
    puts it: its linears views of the banks, so that the stream lends them their slices a module at a time."""
    found = {name: experts.for_inference(m) for name, m in model.named_modules() if experts.is_fused_experts(m)}
    for name, module in found.items():
        set_submodule(model, name, module)
    return found


def _convert(stream, lend, names, linears, ignore, file, written) -> dict:
    """{name: (Conversion, an empty SparseLinear of its shape or None)} of the linears `names`, lent together in `lend`
    (the linear, or the packed experts module holding them), their tensors written to `file`: compressed or dense, or,
    for an experts module none of whose linears converts, its banks (convert leaves it fused). Each linear is written
    as soon as that is known (a packed module's once one of its linears has converted; those before it are views of
    its banks), so one SparseLinear is held at a time, not a module's."""
    banks = isinstance(lend, experts.UnfusedExperts)  # its banks are written instead, unless one of its linears converts
    done, waiting = {}, []
    with stream.lent([lend], "cpu"):
        for name in names:
            record, sparse = convert_linear(name, linears[name], ignore)
            done[name] = (record, None if sparse is None else _shell(linears[name]))
            waiting.append((name, sparse))
            banks = banks and sparse is None
            if not banks:
                for held, compressed in waiting:
                    _write_linear(file, stream, held, compressed or linears[held], compressed is None, written)
                waiting = []
        if banks:
            for bank, parts in experts.fused_banks(lend, lend.state_dict())[1].items():
                file.add(f"{stream.name_of(lend)}.{bank}", torch.stack(parts))
    return done


def _write_linear(file, stream, name, module, dense, written):
    """The linear `name`'s tensors (module's: the lent linear where dense, else its SparseLinear) into file."""
    for full, tensor in module.state_dict(prefix=f"{name}.").items():
        if dense:
            _write_once(file, full, tensor, stream.keys.get(full, full), written)
        else:
            file.add(full, tensor)


def _candidates(stream, state, linears):
    """(name, dtype, shape) of every tensor the file may hold: the model's (its fused banks, or a packed experts
    module's linears), and each linear's compressed ones."""
    yield from ((name, t.dtype, t.shape) for name, t in {**stream.state, **state}.items())
    for name, linear in linears.items():
        if (shell := _shell(linear)) is not None:
            yield from ((f"{name}.{leaf}", t.dtype, t.shape) for leaf, t in shell.state_dict().items())


def _shell(linear):
    """An empty SparseLinear (on the meta device) of the linear's shape, bias and dtype, or None where none can be."""
    out_features, in_features = linear_shape(linear)
    if in_features % 32 or in_features <= 0 or out_features <= 0:
        return None
    return SparseLinear(in_features, out_features, linear.bias is not None, device="meta", dtype=linear.weight.dtype)
