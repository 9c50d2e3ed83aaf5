"""safetensors files read and written a tensor at a time, by plain file reads and writes. A tensor is read straight
into the dtype it is wanted in, a slice at a time where that is not the file's: safetensors gives it in the file's
dtype, and a cast then holds both (1.5x an fp32 tensor read as bf16). A file is written a tensor at a time, each made
only as it is written: safetensors' save takes every tensor at once (and some releases copy each to bytes before
writing; 0.8 does not).

The format: the header's length (8 bytes, little-endian), the JSON header (each tensor's dtype name, shape and byte
span counted from the header's end; "__metadata__"), then the tensors' bytes, little-endian and row-major. Used by the
streamed prune and convert (pipeline/streaming.py, nn/convert_streamed.py).
"""
import dataclasses
import json
import math
import struct
from pathlib import Path

import torch

SINGLE = "model.safetensors"  # a Hugging Face checkpoint's weights in one file
INDEX = "model.safetensors.index.json"  # or in shards, each tensor's named in this index

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


def file_header(path) -> dict[str, Stored]:
    """Tensor name -> Stored of the safetensors file at path (its header read, no tensor)."""
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


def read_tensor(stored: Stored, dtype=None, out=None) -> torch.Tensor:
    """The stored tensor on the host in dtype (default: the file's), by plain reads into the result, a 64 MiB slice at
    a time where the dtype changes. Little-endian, as the format and every host torch runs on. `out`: a contiguous
    tensor of the stored shape to read into, in its own dtype (a place in a larger tensor: no copy of its own)."""
    source = DTYPES.get(stored.dtype)
    if source is None:
        raise ValueError(f"{stored.path} holds a {stored.dtype} tensor, which streaming does not read")
    if stored.end - stored.start != math.prod(stored.shape) * source.itemsize:
        raise ValueError(f"{stored.path}: a tensor's bytes do not match its shape {stored.shape} (a damaged file)")
    if out is None:
        out = torch.empty(stored.shape, dtype=dtype or source)
    elif tuple(out.shape) != tuple(stored.shape) or not out.is_contiguous():
        raise ValueError(f"{stored.path}: a tensor of shape {stored.shape} is read into a contiguous one of its shape, "
                         f"not {'a strided one' if out.shape == stored.shape else tuple(out.shape)}")
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


def held(pairs) -> list:
    """write_safetensors' entries for tensors already held, (name, tensor) pairs."""
    return [(name, t.dtype, t.shape, lambda t=t: t) for name, t in pairs]


def write_safetensors(path, entries) -> int:
    """Write entries [(name, dtype, shape, make)] as a safetensors file, each tensor made (make()) only as its bytes are
    written, and return the bytes of tensor data. safetensors' save_file takes every tensor at once: a stream would hold
    every tensor it reads for the file (embeddings and head, GBs each, at once), and in releases that copy each to
    bytes before writing (not 0.8), all of them twice."""
    room = header_room((name, dtype, shape) for name, dtype, shape, _ in entries)
    with SafetensorsWriter(path, room) as file:
        for name, dtype, shape, make in entries:
            tensor = make()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: {tensor.dtype} {tuple(tensor.shape)}, not the header's {dtype} {shape}")
            file.add(name, tensor)
    return file.size


def write_index(directory, weight_map, total_size):
    """The index of a checkpoint written in shards: each tensor's file (weight_map, name -> file name), and the bytes of
    tensor data in all (total_size)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(directory) / INDEX).write_text(json.dumps(index, indent=2))


class SafetensorsWriter:
    """A safetensors file written a tensor at a time (`add`), whose tensors need not be known before the first is
    written (a linear is compressed or not once its weight is read): their bytes go after room kept for the header,
    which is written when the file closes, padded with spaces as the format allows."""

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
