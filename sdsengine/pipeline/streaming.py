"""A model larger than the host's memory, pruned a layer at a time from its files (`sdsengine prune --stream-weights`,
`sdsengine.prune_checkpoint`).

The model is a skeleton (models.skeleton: its parameters on the meta device, no memory). Each module's weights are read
from the safetensors checkpoint when its turn comes (the embeddings for the capture, then each decoder layer), and each
pruned layer is written out as soon as it is done, in a shard of its own; what no layer holds (embeddings, final norm,
head) is copied from the checkpoint at the end. So the host holds about one layer's weights besides the calibration
activations, where a prune of the loaded model holds all of them. A resumable run (resume.py) fingerprints the
checkpoint's tensors (`tensors`), keeps each layer as written (`written`) and writes those an earlier run finished from
the progress (`write_layer`).

The tensors a prune reads (the embeddings', the decoder layers') are found in the checkpoint under the model's own
names or under those transformers renames to them as it loads (Mixtral's block_sparse_moe is the model's mlp), with
the model's shapes; a name that matches neither is refused, not guessed. A mixture whose experts transformers 5 fuses
on load (Mixtral, Qwen-MoE, ...: stored one by one, held as one 3-D bank per projection) is lent each bank as
transformers builds it (each expert's tensors read straight into their rows of it, where transformers stacks and joins
them: every fused mixture in transformers 5.25), and while a prune runs (its experts unfused into linears: experts.py)
each expert's linears their slices of it.
Every tensor is written back as it was read: under its checkpoint name, a bank as the experts' tensors it was built
from (their rows of the linears' weights, or transformers' own reversal, what save_pretrained does). What no layer
holds is copied under the checkpoint's own names (GPT-NeoX's head is embed_out there, lm_head in the model).
"""
import contextlib
import functools
import json
from pathlib import Path

import torch

from sdsengine import transformers_compat
from sdsengine.report import linear_sizes, weighted_sparsity
from sdsengine.tensorfiles import (INDEX, SINGLE, Stored, file_header, held, read_tensor, write_index,
                                   write_safetensors)

from . import adapters, experts
from .sequential import non_finite

FLOATS = {"F32", "F16", "BF16", "F64"}  # what a checkpoint's dtype names a plain float tensor


def headers(files: dict) -> dict[str, Stored]:
    """Tensor name -> Stored of every tensor of checkpoint_files' `files`, each file's header read once (no tensor
    read)."""
    found = {}
    for path in dict.fromkeys(files.values()):
        found.update(file_header(path))
    return found


def checkpoint_files(directory) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `directory` that holds it (its index, or its one model.safetensors)."""
    directory = Path(directory)
    if (directory / INDEX).is_file():
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / SINGLE).is_file():
        return dict.fromkeys(file_header(directory / SINGLE), directory / SINGLE)
    found = sorted(p.name for p in directory.glob("*.bin")) or ["no weights"]
    raise FileNotFoundError(f"streaming reads a safetensors checkpoint ({INDEX} or {SINGLE}), and {directory} holds "
                            f"{', '.join(found)}: drop --stream-weights to load it whole")


class WeightStream:
    """Lends a skeleton's modules their weights from the checkpoint for their turn (`lent`, used by
    placement.visiting), writes each decoder layer as it leaves its turn, and the rest at `finish`, into `out`."""

    def __init__(self, model, files: dict, out=None, every=False):
        """Refuses a model or checkpoint it cannot stream (out: None to check only). every: find every tensor of the
        model in the checkpoint (a convert and an evaluation read them all, a prune only the embeddings' and the
        layers')."""
        self.model, self.out, self.files = model, out and Path(out), files
        self.prefixes = {id(m): name for name, m in model.named_modules()}
        self.layers = {id(layer): i for i, layer in enumerate(adapters.decoder_layers(model))}
        self.state = model.state_dict(keep_vars=True)  # every tensor a save writes, by name
        self.shapes = {name: tuple(t.shape) for name, t in self.state.items()}  # a prune empties the fused banks
        self.headers = headers(files)
        self.built = transformers_compat.fused_sources(model, self.headers)  # name -> (converter, its sources)
        read = [""] if every else [self.prefixes[id(m)] for m in adapters.pre_layer_modules(model)] + \
            self._layer_prefixes()
        renamed = transformers_compat.loading_names(model, self.headers)
        self.keys = _source_keys(self.state, self.headers, read, renamed, self.built)
        self.weight_map, self.total_size = {}, 0  # the output's index
        self.sizes = {}  # layer index -> its linears' (sparsity, count), as written

    @contextlib.contextmanager
    def lent(self, modules, device):
        """Inside the block, each of `modules` that holds meta parameters holds the checkpoint's, on `device`; a decoder
        layer is written to the output (if any) as it leaves, unless the block raised. After it, the meta parameters
        again."""
        sources = {}  # what each is read from: a tied weight's one tensor, a bank for all its experts' slices
        for slot in (slot for module in modules for slot in self._meta_slots(module)):
            sources.setdefault(self._source(slot[2]), []).append(slot)
        taken = []
        try:
            for slots in sources.values():  # one source's host copy at a time (a bank: the experts' views of it)
                read = self._model_tensor(slots[0][2])  # in the skeleton's dtype
                for store, name, full, take in slots:
                    own = store[name]
                    tensor = take(read).to(device)
                    if bad := non_finite(tensor):
                        raise ValueError(f"{self._described(full)} holds {bad} inf/NaN values; a damaged checkpoint "
                                         "cannot be used")
                    store[name] = torch.nn.Parameter(tensor, own.requires_grad)
                    taken.append((store, name, own))
                del read
            yield
            for module in modules:
                if id(module) in self.layers and self.out is not None:
                    self.write_layer(module, module.state_dict())
        finally:
            for store, name, own in taken:
                store[name] = own

    def finish(self):
        """Write what no decoder layer holds and the index: the checkpoint's tensors under its names, in the model's
        dtypes (a name the model does not have, in the model's dtype), and the model's persistent buffers that the
        checkpoint lacks (save_pretrained writes them)."""
        if len(self.sizes) != len(self.layers):
            raise RuntimeError(f"the stream was finished with {len(self.sizes)} of {len(self.layers)} decoder layers "
                               "written")
        under = tuple(p + "." for p in self._layer_prefixes())
        names = {key: name for name, key in self.keys.items()}
        entries = []
        for key in self.files:  # read one at a time as the file is written: embeddings and head can be GBs each
            if not key.startswith(under) and key not in self.weight_map:  # a layer's, read under another name
                dtype = self.state[names[key]].dtype if key in names else self.model.dtype
                shape = self.headers[key].shape
                entries.append((key, dtype, shape, lambda key=key, dtype=dtype: self._read(key, dtype)))
        entries += held((name, t) for name, t in self.state.items()
                        if not t.is_meta and name not in self.keys and not name.startswith(under))
        self._write(len(self.layers), entries)
        write_index(self.out, self.weight_map, self.total_size)

    def tensors(self):
        """(name, tensor) of the model's state dict as it is now, read from the checkpoint one at a time where the
        skeleton holds none, as the loaded model would hold them (a mixture's experts, unfused while a prune runs, as
        their slices of the banks); then the checkpoint's tensors that none of them is read from (a resumed run's
        fingerprint: resume.identity)."""
        yield from self._model_state(self.model, self.headers)
        named = set(self.keys.values()) | {key for name in self.built for key in self._built_from(name)}
        for key in self.files:
            if key not in named:
                yield key, self._read(key)

    def read(self, name):
        """The model's tensor `name` as the loaded model would hold it: the skeleton's own where it holds one (a buffer
        its constructor computes), else the checkpoint's in the model's dtype."""
        own = self.state[name]
        return own if not own.is_meta else self._model_tensor(name)

    def write_layer(self, layer, state):
        """Write decoder layer `layer` holding `state` (its state dict, the model's names: its own as it leaves its
        turn, a mixture's experts as linears while a prune runs; or an earlier run's from the resume directory) as its
        shard, under the checkpoint's names, and count its linears' sparsity."""
        prefix, index = self.prefixes[id(layer)], self.layers[id(layer)]
        rest, banks = experts.fused_banks(layer, state)
        # each under the key it was read from (a buffer under its name)
        entries = held((self.keys.get(f"{prefix}.{name}", f"{prefix}.{name}"), t) for name, t in rest.items())
        for name, parts in banks.items():
            entries += self._bank_entries(f"{prefix}.{name}", parts)
        self._write(index, entries)
        self.sizes[index] = linear_sizes(layer, state)

    def written(self, layer):
        """The layer's state dict (the model's names, as it left its turn) read back from the shard this stream wrote,
        for the resume directory (the layer is a skeleton again), from which write_layer takes it back."""
        under = self.prefixes[id(layer)] + "."
        shard = file_header(self.out / self._file(self.layers[id(layer)]))
        return {name.removeprefix(under): t for name, t in self._model_state(layer, shard)}

    def decoder_sparsity(self):
        """report.decoder_sparsity of the model written: counted as each layer was."""
        return weighted_sparsity(pair for pairs in self.sizes.values() for pair in pairs)

    def name_of(self, module):
        """module's name in the model; one put in since the stream began (a convert's packed experts) looked up anew."""
        if id(module) not in self.prefixes:
            self.prefixes = {id(m): name for name, m in self.model.named_modules()}
        return self.prefixes[id(module)]

    def _model_state(self, module, headers):
        """(name, tensor) of `module`'s state dict now, as the loaded model holds it: the skeleton's own tensors, the
        rest read from `headers` (the checkpoint's, or a layer's shard this stream wrote: the same names). An unfused
        expert's linear is its slice of its bank (the banks of one experts module held at a time)."""
        prefix = self.name_of(module)
        slices, banks = experts.slices(module, prefix), {}
        for name, t in module.state_dict(prefix=prefix and prefix + ".", keep_vars=True).items():
            if name in slices:
                bank, take = slices[name]
                if bank not in banks:
                    owner = bank.rpartition(".")[0]
                    banks = {b: v for b, v in banks.items() if b.rpartition(".")[0] == owner}
                    banks[bank] = self._model_tensor(bank, headers)
                yield name, take(banks[bank])
            elif not t.is_meta:
                yield name, t
            elif name in self.keys or name in self.built:
                yield name, self._model_tensor(name, headers)

    def _meta_slots(self, module):
        """(the dict holding it, its name, the model's tensor it is read from, how it is taken from that tensor) of
        each meta parameter of module: the weights to read. An unfused expert's linear is its slice of the fused
        module's bank."""
        prefix = self.name_of(module)
        slices = experts.slices(module, prefix)
        for sub_name, sub in module.named_modules():
            for name, p in sub._parameters.items():
                if p is not None and p.is_meta:
                    full = ".".join(filter(None, (prefix, sub_name, name)))
                    yield sub._parameters, name, *slices.get(full, (full, _whole))

    def _source(self, name):
        """What holds the model's tensor `name`: its checkpoint key, or for a fused bank built from several, its own
        name."""
        return name if name in self.built else self.keys[name]

    def _described(self, name):
        return f"checkpoint tensor {self.keys[name]}" if name not in self.built else \
            f"{name}, built from the checkpoint's experts,"

    def _built_from(self, name):
        """The checkpoint keys a built bank is made of."""
        return [key for keys in self.built[name][1].values() for key in keys]

    def _bank_entries(self, name, parts):
        """Entries that write the fused bank `name` (its experts' slices `parts`, experts.fused_banks) as it was read:
        under its key, or as the tensors it was built from: each its rows of an expert's slice where transformers
        stacks and joins them (_filled's inverse: no bank is made), else split back from the bank by transformers (as
        save_pretrained splits it; the bank stacked when its first tensor is written, let go with its last)."""
        dtype, shape = self.state[name].dtype, self.shapes[name]
        make = functools.partial(torch.stack, parts)
        if name not in self.built:
            return [(self.keys[name], dtype, shape, make)]
        if transformers_compat.stacks_rows(self.built[name][0]):
            return self._rows_entries(name, parts)
        layout = transformers_compat.reverted(self.model, {name: torch.empty(shape, dtype=dtype, device="meta")})
        if layout.keys() != set(self._built_from(name)):
            raise RuntimeError(f"transformers splits {name} into {len(layout)} tensors, not the "
                               f"{len(self._built_from(name))} it was built from: it cannot be written as read")
        split = _Split(lambda: transformers_compat.reverted(self.model, {name: make()}), layout)
        return [(key, t.dtype, t.shape, functools.partial(split.take, key)) for key, t in layout.items()]

    def _model_tensor(self, name, headers=None):
        """The model's tensor `name` in the skeleton's dtype: the checkpoint's (or those of `headers`, under the same
        names), or a fused bank built from the experts' tensors."""
        headers, dtype = self.headers if headers is None else headers, self.state[name].dtype
        if name not in self.built:
            return read_tensor(headers[self.keys[name]], dtype)
        converter, sources = self.built[name]
        try:
            if transformers_compat.stacks_rows(converter):
                tensor = self._filled(name, converter, sources, headers, dtype)
            else:  # transformers' steps let each input go as they take it (the dict is emptied)
                tensor = transformers_compat.fused(self.model, name, converter, {
                    pattern: [read_tensor(headers[key], dtype) for key in keys] for pattern, keys in sources.items()
                }).contiguous()
        except RuntimeError as exc:  # the experts' tensors do not stack (one missing, or of another shape)
            raise ValueError(f"the checkpoint's {sum(map(len, sources.values()))} tensors for {name} do not build it "
                             f"({exc}): it cannot be streamed (drop --stream-weights)") from None
        if tuple(tensor.shape) != self.shapes[name]:
            raise ValueError(f"the checkpoint's experts build {name} as {tuple(tensor.shape)}, the model's is "
                             f"{self.shapes[name]}: it cannot be streamed (drop --stream-weights)")
        return tensor

    def _filled(self, name, converter, sources, headers, dtype):
        """Bank `name` built as transformers' stacking and joining build it (transformers_compat.stacks_rows), each
        expert's tensor read straight into its rows: transformers' steps hold their inputs beside their outputs, up to
        three of a layer's largest bank at once."""
        shape = self.shapes[name]
        bank, stop = torch.empty(shape, dtype=dtype), 0
        for pattern, keys, start, stop in transformers_compat.row_spans(converter, sources, headers):
            if len(keys) != shape[0] or any(tuple(headers[k].shape) != (stop - start, *shape[2:]) for k in keys):
                raise RuntimeError(f"{len(keys)} tensors of {pattern}, of shapes "
                                   f"{sorted({tuple(headers[k].shape) for k in keys})}, for {shape[0]} experts")
            for e, key in enumerate(keys):
                read_tensor(headers[key], out=bank[e, start:stop])
        if stop != shape[1]:  # the last pattern's rows end where the bank's do
            raise RuntimeError(f"{stop} rows for {shape[1]}")
        return bank

    def _rows_entries(self, name, parts):
        """Entries that write each checkpoint tensor bank `name` was built from (_filled) as its rows of its expert's
        slice of the bank, parts[e]: views of what the layer holds, where transformers' split would copy the bank."""
        return held(transformers_compat.rows_split(*self.built[name], self.headers, parts).items())

    def _read(self, key, dtype=None):
        """The checkpoint's tensor `key` on the host, in dtype (default: the file's)."""
        return read_tensor(self.headers[key], dtype)

    def _file(self, shard):
        return f"model-{shard + 1:05d}-of-{len(self.layers) + 1:05d}.safetensors"

    def _layer_prefixes(self):
        return [self.prefixes[i] for i in self.layers]

    def _write(self, shard, entries):
        """entries as shard number `shard` of len(layers) + 1 (the last holds what no layer does)."""
        file = self._file(shard)
        self.total_size += write_safetensors(self.out / file, entries)
        self.weight_map.update(dict.fromkeys((name for name, *_ in entries), file))


def _whole(tensor):
    return tensor


class _Split:
    """A bank's tensors under the checkpoint's names (split(): {key: tensor}), split when the first is taken and let go
    with the last: a layer's banks are written one at a time."""

    def __init__(self, split, keys):
        self.split, self.left, self.tensors = split, set(keys), None

    def take(self, key):
        if self.tensors is None:
            self.tensors = self.split()
        tensor = self.tensors[key].contiguous()
        self.left.discard(key)
        if not self.left:
            self.tensors = None
        return tensor


def _source_keys(state, headers, read, renamed=None, built=()):
    """The skeleton's tensor names -> the checkpoint's name that holds its values (its own, or where it is tied to
    another, the other's; else one that `renamed` maps to either), checked against the checkpoint's shapes and dtypes.
    Each parameter under the prefixes `read` must be found, or be among `built` (made from several checkpoint tensors);
    a buffer the checkpoint lacks keeps the skeleton's value, as from_pretrained keeps it."""
    read = tuple(p + "." if p else "" for p in read)
    aliases = {name: key for key, name in (renamed or {}).items()}
    names_of = {}
    for name, tensor in state.items():
        names_of.setdefault(id(tensor), []).append(name)
    keys, missing = {}, []
    for name, tensor in state.items():
        named = [name, *names_of[id(tensor)]]
        key = next((n for n in named if n in headers), None) or next((aliases[n] for n in named if n in aliases), None)
        if key is None:
            if tensor.is_meta and name.startswith(read) and name not in built:
                missing.append(name)
            continue
        keys[name] = key
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"the checkpoint holds no tensor named {', '.join(missing[:3])}{more}: its names are not the "
                         "model's (transformers converts them on load), so it cannot be streamed: drop "
                         "--stream-weights to load it whole")
    for name, key in keys.items():
        shape, dtype = headers[key].shape, headers[key].dtype
        if shape != tuple(state[name].shape):
            raise ValueError(f"checkpoint tensor {key} has shape {shape}, the model's {name} "
                             f"{tuple(state[name].shape)}: it cannot be streamed (drop --stream-weights)")
        if state[name].is_floating_point() and dtype not in FLOATS:
            raise ValueError(f"checkpoint tensor {key} is {dtype}, not a float tensor (a quantized checkpoint?): "
                             "it cannot be streamed")
    return keys
