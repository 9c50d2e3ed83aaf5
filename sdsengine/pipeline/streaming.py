"""A model larger than the host's memory, pruned a layer at a time from its files (`sdsengine prune --stream-weights`,
`sdsengine.prune_checkpoint`).

The model is a skeleton (models.skeleton: its parameters on the meta device, no memory). Each module's weights are read
from the safetensors checkpoint when its turn comes (the embeddings for the capture, then each decoder layer), and each
pruned layer is written out as soon as it is done, in a shard of its own; what no layer holds (embeddings, final norm,
head) is copied from the checkpoint at the end. So the host holds about one layer's weights besides the calibration
activations, where a prune of the loaded model holds all of them. A resumable run (resume.py) fingerprints the
checkpoint's tensors (`tensors`), keeps each layer as written (`written`) and writes those an earlier run finished from
the progress (`write_layer`).

The tensors a prune reads (the embeddings', the decoder layers') must have the model's own names and shapes in the
checkpoint: transformers renames some families' keys as it loads them (it fuses a mixture's experts in transformers 5),
and a name that does not match is refused, not guessed. What no layer holds is copied under the checkpoint's own names
(GPT-NeoX's head is embed_out there, lm_head in the model), as save_pretrained writes it back.
"""
import contextlib
import dataclasses
import json
import math
import struct
from pathlib import Path

import torch

from sdsengine import transformers_compat
from sdsengine.report import linear_sizes, weighted_sparsity

from . import adapters, experts
from .sequential import non_finite

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOATS = {"F32", "F16", "BF16", "F64"}  # what a checkpoint's dtype names a plain float tensor
CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
         torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES = {code: dtype for dtype, code in CODES.items()}


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where a checkpoint tensor lies: its file, its shape, the file's dtype name (e.g. "BF16") and its bytes' span in
    the file."""
    path: Path
    shape: tuple
    dtype: str
    start: int
    end: int


def headers(files: dict) -> dict[str, Stored]:
    """Tensor name -> Stored of every tensor of checkpoint_files' `files`, each file's header read once (no tensor
    read)."""
    found = {}
    for path in dict.fromkeys(files.values()):
        found.update(file_header(path))
    return found


def file_header(path) -> dict[str, Stored]:
    """Tensor name -> Stored of the safetensors file at path: its 8-byte little-endian header length, the JSON header,
    then the tensors' bytes at the header's offsets from the header's end."""
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        return {key: Stored(Path(path), tuple(spec["shape"]), spec["dtype"], 8 + length + spec["data_offsets"][0],
                            8 + length + spec["data_offsets"][1]) for key, spec in header.items()}
    except (struct.error, ValueError, KeyError, TypeError, IndexError, MemoryError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


# bytes read at a time where the dtype changes (the slice held in the file's dtype beside the result)
_SLICE_BYTES = 1 << 26


def read_tensor(stored: Stored, dtype=None) -> torch.Tensor:
    """The stored tensor on the host in dtype (default: the file's), by plain reads. safetensors' own reader maps the
    file, and the mapped pages count in the process's RSS while it is open, then copies the tensor out: twice the
    tensor, and a cast made a third copy. Here the result is the only copy, but a slice's where the dtype changes.
    Little-endian, as the format and every host torch runs on."""
    source = DTYPES.get(stored.dtype)
    if source is None:
        raise ValueError(f"{stored.path} holds a {stored.dtype} tensor, which streaming does not read")
    if stored.end - stored.start != math.prod(stored.shape) * source.itemsize:
        raise ValueError(f"{stored.path}: a tensor's bytes do not match its shape {stored.shape} (a damaged file)")
    out = torch.empty(stored.shape, dtype=dtype or source)
    flat = out.view(-1)
    with open(stored.path, "rb") as f:
        f.seek(stored.start)
        if out.dtype == source:
            _fill(f, flat, stored.path)
            return out
        step = max(1, _SLICE_BYTES // source.itemsize)
        part = torch.empty(min(step, flat.numel()), dtype=source)
        for i in range(0, flat.numel(), step):
            piece = part[:min(step, flat.numel() - i)]
            _fill(f, piece, stored.path)
            flat[i:i + piece.numel()].copy_(piece)
    return out


def _fill(f, tensor, path):
    """Read the 1-D tensor's bytes from f's position."""
    buffer, done = memoryview(tensor.view(torch.uint8).numpy()), 0
    while done < len(buffer):
        count = f.readinto(buffer[done:])
        if not count:
            raise ValueError(f"{path} ends inside a tensor: the file is truncated")
        done += count


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

    def __init__(self, model, files: dict, out=None):
        """Refuses a model or checkpoint it cannot stream (out: None to check only)."""
        refuse_unstreamable(model)
        self.model, self.out, self.files = model, out and Path(out), files
        self.prefixes = {id(m): name for name, m in model.named_modules()}
        self.layers = {id(layer): i for i, layer in enumerate(adapters.decoder_layers(model))}
        self.state = model.state_dict(keep_vars=True)  # every tensor a save writes, by name
        self.headers = headers(files)
        read = [self.prefixes[id(m)] for m in adapters.pre_layer_modules(model)] + self._layer_prefixes()
        self.keys = _source_keys(self.state, self.headers, read)
        self.weight_map, self.total_size = {}, 0  # the output's index
        self.sizes = {}  # layer index -> its linears' (sparsity, count), as written

    @contextlib.contextmanager
    def lent(self, modules, device):
        """Inside the block, each of `modules` that holds meta parameters holds the checkpoint's, on `device`; a decoder
        layer is written to the output as it leaves, unless the block raised. After it, the meta parameters again."""
        slots = [slot for module in modules for slot in self._meta_slots(module)]
        read = {}
        for store, name, full in slots:  # in the skeleton's dtypes; a tied weight's one tensor once
            if self.keys[full] not in read:
                read[self.keys[full]] = self._read(self.keys[full], store[name].dtype)
        taken = []
        try:
            for store, name, full in slots:
                own = store[name]
                tensor = read[self.keys[full]].to(device)
                if bad := non_finite(tensor):
                    raise ValueError(f"checkpoint tensor {self.keys[full]} holds {bad} inf/NaN values; a damaged "
                                     "checkpoint cannot be pruned")
                store[name] = torch.nn.Parameter(tensor, own.requires_grad)
                taken.append((store, name, own))
            del read  # the host copies, where the weights went to another device
            yield
            for module in modules:
                if id(module) in self.layers:
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
            if not key.startswith(under):
                dtype = self.state[names[key]].dtype if key in names else self.model.dtype
                shape = self.headers[key].shape
                entries.append((key, dtype, shape, lambda key=key, dtype=dtype: self._read(key, dtype)))
        entries += [(name, t.dtype, t.shape, lambda t=t: t) for name, t in self.state.items()
                    if not t.is_meta and name not in self.keys and not name.startswith(under)]
        self._write(len(self.layers), entries)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2))

    def tensors(self):
        """(name, tensor) of the model's state dict, read from the checkpoint one at a time where the skeleton holds
        none (as the loaded model would hold them); then the checkpoint's tensors under names the model does not
        have (a resumed run's fingerprint: resume.identity)."""
        for name, t in self.state.items():
            if not t.is_meta or name in self.keys:
                yield name, self.read(name)
        named = set(self.keys.values())
        for key in self.files:
            if key not in named:
                yield key, self._read(key)

    def read(self, name):
        """The model's tensor `name` as the loaded model would hold it: the skeleton's own where it holds one (a buffer
        its constructor computes), else the checkpoint's in the model's dtype."""
        own = self.state[name]
        if not own.is_meta:
            return own
        key = self.keys[name]
        return self._read(key, own.dtype)

    def find_all(self):
        """Find every tensor of the model in the checkpoint (a convert reads them all, a prune only the embeddings' and
        the layers'): under its own name, a tied one's, or the name transformers renames to it as it loads (GPT-NeoX's
        embed_out is the model's lm_head); refuse the checkpoint where one is missing."""
        renamed = transformers_compat.loading_names(self.model, self.headers)
        self.keys = _source_keys(self.state, self.headers, [""], renamed)

    def write_layer(self, layer, state):
        """Write decoder layer `layer` holding `state` (its state dict: its own as it leaves its turn, or an earlier
        run's from the resume directory) as its shard, and count its linears' sparsity."""
        prefix, index = self.prefixes[id(layer)], self.layers[id(layer)]
        self._write(index, [(f"{prefix}.{name}", t.dtype, t.shape, lambda t=t: t) for name, t in state.items()])
        self.sizes[index] = linear_sizes(layer, state)

    def written(self, layer):
        """The layer's state dict as this stream wrote it (for the resume directory: the layer is a skeleton again)."""
        prefix, index = self.prefixes[id(layer)] + ".", self.layers[id(layer)]
        return {key.removeprefix(prefix): read_tensor(stored)
                for key, stored in file_header(self.out / self._file(index)).items()}

    def decoder_sparsity(self):
        """report.decoder_sparsity of the model written: counted as each layer was."""
        return weighted_sparsity(pair for pairs in self.sizes.values() for pair in pairs)

    def _meta_slots(self, module):
        """(the dict holding it, its name, its full name) of each meta parameter of module: the weights to read."""
        prefix = self.prefixes[id(module)]
        for sub_name, sub in module.named_modules():
            for name, p in sub._parameters.items():
                if p is not None and p.is_meta:
                    yield sub._parameters, name, ".".join(filter(None, (prefix, sub_name, name)))

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


def write_safetensors(path, entries) -> int:
    """Write entries [(name, dtype, shape, make)] as a safetensors file, each tensor made (make()) only as its bytes are
    written, and return the bytes of tensor data. safetensors' save_file takes every tensor at once and copies each to
    bytes before writing: for a pruned layer that held it twice, for embeddings and head (GBs each) all of them
    twice."""
    room = header_room((name, dtype, shape) for name, dtype, shape, _ in entries)
    with SafetensorsWriter(path, room) as file:
        for name, dtype, shape, make in entries:
            tensor = make()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: {tensor.dtype} {tuple(tensor.shape)}, not the header's {dtype} {shape}")
            file.add(name, tensor)
    return file.size


class SafetensorsWriter:
    """A safetensors file written a tensor at a time (`add`), whose tensors need not be known before the first is
    written (a linear is compressed or not once its weight is read): their bytes go after room kept for the header,
    which is written when the file closes, padded with spaces as the format allows. The format: the header's length
    (8 bytes, little-endian), the JSON header, then each tensor's bytes, little-endian and row-major, at the offsets
    the header gives from the end of the header."""

    def __init__(self, path, room):
        """room: bytes kept for the header (header_room of every tensor that may be added)."""
        self.room, self.size = room, 0
        self.header = {"__metadata__": {"format": "pt"}}
        self.file = open(path, "wb")
        self.file.seek(8 + room)

    def add(self, name, tensor):
        """Append `tensor` under `name` (one tensor on the host at a time: one on the GPU comes over alone)."""
        if name in self.header:
            raise ValueError(f"{name} is in the file already")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        self.header[name] = {"dtype": CODES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + size]}
        self.file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.size += size

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        try:
            if kind is None:  # a file left without its header is no safetensors file: the caller's staging discards it
                text = json.dumps(self.header, separators=(",", ":")).encode()
                if len(text) > self.room:
                    raise RuntimeError(f"the header takes {len(text)} bytes, over the {self.room} kept for it")
                self.file.seek(0)
                self.file.write(struct.pack("<Q", self.room) + text + b" " * (self.room - len(text)))
        finally:
            self.file.close()


# an offset's most digits: files up to 10**20 bytes
_LARGEST_OFFSET = 10 ** 20


def header_room(entries) -> int:
    """Bytes that the header of a file holding any of entries [(name, dtype, shape)] fits in, a multiple of 8 (the
    tensors' data stays aligned): each entry's text with the longest offsets."""
    header = {"__metadata__": {"format": "pt"}}
    header.update({name: {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [_LARGEST_OFFSET] * 2}
                   for name, dtype, shape in entries})
    text = json.dumps(header, separators=(",", ":")).encode()
    return len(text) + (-len(text) % 8)


def refuse_unstreamable(model):
    """A mixture whose experts the model holds fused (transformers 5): prune it whole, or say so plainly."""
    for i, layer in enumerate(adapters.decoder_layers(model)):
        if any(experts.is_fused_experts(m) for m in layer.modules()):
            raise ValueError(f"layer {i} holds a mixture's experts fused in one tensor per projection, which streaming "
                             "does not read: drop --stream-weights to load the model whole")


def _source_keys(state, headers, read, renamed=None):
    """The skeleton's tensor names -> the checkpoint's name that holds its values (its own, or where it is tied to
    another, the other's; else one that `renamed` maps to either), checked against the checkpoint's shapes and dtypes.
    Each parameter under the prefixes `read` must be found; a buffer the checkpoint lacks keeps the skeleton's value, as
    from_pretrained keeps it."""
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
            if tensor.is_meta and name.startswith(read):
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
