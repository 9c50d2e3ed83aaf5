"""A pruned checkpoint converted from its files a linear at a time (`sdsengine convert --stream-weights`,
sdsengine.convert_checkpoint): what save_compressed writes for convert(the loaded model), while the host holds one
linear's weight at a time, so a checkpoint larger than the host's memory converts.

The model is a skeleton (models.skeleton: its parameters on the meta device). Each linear's weight is read from the
safetensors files when its turn comes (pipeline/streaming.py's WeightStream) and converted by convert's own rule; its
tensors, compressed or dense, go straight into the compressed checkpoint's one file, whose header is written
last (tensorfiles.SafetensorsWriter). Every other tensor of the model follows in its state dict's order, one at a
time, a tied one once: a mixture's fused experts banks too (built as transformers builds them on load from experts
stored one by one), which convert leaves dense and fused (--pack-experts, which would convert each expert, reads them
whole and is not streamed). Refused as a streamed prune refuses: names or shapes that are not the model's, GGUF, `.bin`
weights.
"""
from sdsengine.checkpoint import check_output_dir, staged_directory
from sdsengine.config import ignore_patterns
from sdsengine.nn.convert import (WEIGHTS, Conversion, check_some_converted, convert_linear, linear_shape, linears_of,
                                  log_summary, set_submodule, warn_float32, write_beside)
from sdsengine import tensorfiles
from sdsengine.nn.sparse_linear import SparseLinear


def convert_checkpoint(model, out, ignore=("lm_head",), dtype=None, overwrite=False) -> list[Conversion]:
    """save_compressed(convert(load_model(model, dtype)), out, its tokenizer), read from the files of `model` (a
    safetensors checkpoint directory or a hub id) a linear at a time. dtype: of the compressed model (default: the
    checkpoint's; the sparse kernels run float16 and bfloat16). Returns one Conversion per linear; `out` is written
    whole or not at all (replaced with overwrite), and not when no linear converts."""
    from sdsengine.models import load_model
    out = check_output_dir(out, overwrite)  # before any work
    model, tokenizer, source = load_model(model, dtype or "auto", needs_tokenizer=False, skeleton=True)
    return write_converted(model, source, out, tokenizer, ignore, overwrite)


def write_converted(model, source, out, tokenizer=None, ignore=("lm_head",), overwrite=False) -> list[Conversion]:
    """convert_checkpoint of the skeleton `model` (in the dtype to convert in) of `source` (load_model's)."""
    from sdsengine.models import weights_directory
    from sdsengine.pipeline import streaming  # it imports nn (through the pipeline): not at the top
    ignore = ignore_patterns(ignore)
    files = streaming.checkpoint_files(weights_directory(source))
    stream = streaming.WeightStream(model, files, every=True)  # every name checked before a byte is written
    named = list(model.named_modules(remove_duplicate=False))
    linears = linears_of(named)
    first = {id(m): name for name, m in linears.items()}
    owner = {f"{name}.{leaf}": first[id(m)] for name, m in named if id(m) in first for leaf in m.state_dict()}
    records, shells = {}, {}
    with staged_directory(out, overwrite) as staged:
        room = tensorfiles.header_room(_candidates(stream, linears))
        with tensorfiles.SafetensorsWriter(staged / WEIGHTS, room) as file:
            written = set()  # the checkpoint's tensors written dense: a tied embedding and head once
            for name in stream.state:
                if name not in owner:
                    _write_once(file, name, stream.read(name), stream.keys.get(name, name), written)
                elif owner[name] not in records:
                    records[owner[name]], shells[owner[name]] = _convert(stream, owner[name], linears, ignore, file,
                                                                         written)
        records = list(records.values())
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


def _convert(stream, name, linears, ignore, file, written):
    """(Conversion, an empty SparseLinear of its shape or None) of linear `name`, its tensors written to `file`."""
    linear = linears[name]
    with stream.lent([linear], "cpu"):
        record, sparse = convert_linear(name, linear, ignore)
        if sparse is None:
            for full, tensor in linear.state_dict(prefix=f"{name}.").items():
                _write_once(file, full, tensor, stream.keys.get(full, full), written)
            return record, None
        for full, tensor in sparse.state_dict(prefix=f"{name}.").items():
            file.add(full, tensor)
    return record, _shell(linear)


def _candidates(stream, linears):
    """(name, dtype, shape) of every tensor the file may hold: the model's, and each linear's compressed ones."""
    yield from ((name, t.dtype, t.shape) for name, t in stream.state.items())
    for name, linear in linears.items():
        if (shell := _shell(linear)) is not None:
            yield from ((f"{name}.{leaf}", t.dtype, t.shape) for leaf, t in shell.state_dict().items())


def _shell(linear):
    """An empty SparseLinear (on the meta device) of the linear's shape, bias and dtype, or None where none can be."""
    out_features, in_features = linear_shape(linear)
    if in_features % 32 or in_features <= 0 or out_features <= 0:
        return None
    return SparseLinear(in_features, out_features, linear.bias is not None, device="meta", dtype=linear.weight.dtype)
