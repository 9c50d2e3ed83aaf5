"""sdsengine.kernels: the pruning math, as Triton kernels on CUDA and plain PyTorch elsewhere.

One switch picks the backend: SDSENGINE_KERNELS=auto (default: Triton for CUDA tensors, the
reference otherwise), =triton (force Triton, e.g. under TRITON_INTERPRET=1 on CPU), =torch (force the
reference). `use_backend` overrides it in-process (tests).

Inputs are checked here, once, for every backend. No kernel is differentiable, on either backend: their
outputs never require grad (the Triton path cannot keep autograd, and the reference must not differ).
Triton is imported only when a kernel runs, so the package imports without it; inputs a kernel does not
cover (other dtypes, non-power-of-2 M, rows or blocks too wide for registers) take the reference, which
defines the result anyway. See README.md.
"""
import contextlib
import importlib.util
import os
import re

import torch

from sdsengine import masks

from . import reference

_forced = None
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_M = 32          # N:M groups are ranked with M^2 compares, unrolled
_MAX_ROW = 65536     # unstructured Wanda keeps a whole row in registers
_MAX_BLOCK = 1024    # SparseGPT keeps rows x the whole block in registers
_REFERENCE_BLOCK = 1 << 20  # a weight's elements the references take at a time (_row_blocks)


@contextlib.contextmanager
def use_backend(name):
    """Force 'triton', 'torch' or 'auto' inside a with-block."""
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _backend_for(tensor):
    choice = _forced or os.environ.get("SDSENGINE_KERNELS", "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"SDSENGINE_KERNELS must be auto, triton or torch, got {choice!r}")
    if choice == "auto":
        return "triton" if tensor.is_cuda else "torch"
    return choice


def _use_triton(tensor, covered=True):
    """Whether the Triton kernel runs on `tensor` (inputs it does not cover never need triton); raises
    where Triton is forced but cannot run."""
    if _backend_for(tensor) != "triton" or not covered:
        return False
    forced = (_forced or os.environ.get("SDSENGINE_KERNELS", "auto")) == "triton"
    if importlib.util.find_spec("triton") is None:
        if forced:
            raise RuntimeError("SDSENGINE_KERNELS=triton, but triton is not installed (pip install triton)")
        return False
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {tensor.device}), or TRITON_INTERPRET=1 "
                           "set before triton is first imported")
    if os.environ.get("TRITON_INTERPRET") == "1" and (problem := _interpreter_problem()):
        raise RuntimeError(problem)
    return True


def _interpreter_problem():
    """Why Triton's interpreter cannot run the kernels here, or None. Up to 3.6 it turns one-element arrays
    into loop bounds with int(), which NumPy 2.4 refuses; every kernel with a runtime loop bound fails."""
    import numpy
    import triton

    def release(version):
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__}: "
                "install numpy<2.4 or triton>=3.7")
    return None


def _device_of(tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@torch.no_grad()
def wanda_prune(weight, act_norm, sparsity=0.5, nm=None):
    """(pruned weight, keep mask) by Wanda scores; nm=(n, m) for N:M, else per-row `sparsity`."""
    _check_matrix("wanda_prune", "weight", weight)
    _check_same_device("wanda_prune", weight, act_norm)
    vector = act_norm.dim() >= 1 and act_norm.shape[-1] == act_norm.numel() == weight.shape[1]  # (cols,), (1, cols)
    if not vector or not act_norm.is_floating_point():
        raise ValueError(f"wanda_prune: act_norm must be a float vector of {weight.shape[1]} (weight's columns), "
                         f"got shape {tuple(act_norm.shape)} {act_norm.dtype}")
    _check_pattern("wanda_prune", weight.shape[1], sparsity, nm)
    covered = weight.dtype in _KERNEL_DTYPES and _m_covered(nm) and (bool(nm) or weight.shape[1] <= _MAX_ROW)
    if not _use_triton(weight, covered):  # its rows are pruned each on its own (per row, or per group of M)
        return _row_blocks(lambda rows: reference.wanda_prune(rows, act_norm, sparsity, nm), weight)
    norm = act_norm.reshape(-1)
    with _device_of(weight):
        return _kernel("wanda").wanda_prune(weight, norm if norm.dtype in _KERNEL_DTYPES else norm.float(),
                                            sparsity, nm)


@torch.no_grad()
def nm_mask(scores, n, m):
    """Keep mask of the n highest scores in every group of m along the last dim (sdsengine.masks.nm_mask,
    which hands its CUDA tensors here)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"nm_mask: scores must be a tensor, got {type(scores).__name__}")
    masks.check_nm(scores, n, m)
    covered = scores.dtype in _KERNEL_DTYPES + (torch.float64,) and scores.dim() >= 1 and _m_covered((n, m))
    if not _use_triton(scores, covered):
        return reference.nm_mask(scores, n, m)
    with _device_of(scores):
        return _kernel("nm_select").nm_mask(scores, n, m)


@torch.no_grad()
def sparsegpt_block(w_block, hinv_block, sparsity=0.5, nm=None):
    """(Q, E, losses) for one SparseGPT block; see reference.sparsegpt_block."""
    _check_matrix("sparsegpt_block", "w_block", w_block)
    _check_same_device("sparsegpt_block", w_block, hinv_block)
    width = w_block.shape[1]
    if hinv_block.shape != (width, width) or not hinv_block.is_floating_point():
        raise ValueError(f"sparsegpt_block: hinv_block must be a float ({width}, {width}) matrix for a block of "
                         f"{width} columns, got {tuple(hinv_block.shape)} {hinv_block.dtype}")
    _check_pattern("sparsegpt_block", width, sparsity, nm)
    covered = (w_block.dtype in _KERNEL_DTYPES and hinv_block.dtype == torch.float32 and _m_covered(nm)
               and width <= _MAX_BLOCK)
    if not _use_triton(w_block, covered):
        return reference.sparsegpt_block(w_block, hinv_block, sparsity, nm)
    with _device_of(w_block):
        return _kernel("sparsegpt").sparsegpt_block(w_block, hinv_block, sparsity, nm)


@torch.no_grad()
def compress_24(weight, scores=None):
    """(values, meta) in the 2:4 layout the CUDA matmul consumes; see reference.compress_24."""
    _check_matrix("compress_24", "weight", weight)
    if weight.shape[1] % 32:
        raise ValueError(f"compress_24: 2:4 compression needs in_features divisible by 32, got {weight.shape[1]}")
    if scores is not None:
        _check_same_device("compress_24", weight, scores)
        if scores.shape != weight.shape or not scores.is_floating_point():
            raise ValueError(f"compress_24: scores must be float and shaped like weight {tuple(weight.shape)}, "
                             f"got {tuple(scores.shape)} {scores.dtype}")
    covered = weight.dtype in _KERNEL_DTYPES and (scores is None or scores.dtype in _KERNEL_DTYPES)
    if not _use_triton(weight, covered):
        return _row_blocks(reference.compress_24, weight, scores)
    with _device_of(weight):
        return _kernel("compress").compress_24(weight, scores)


@torch.no_grad()
def decompress_24(values, meta, trusted=False):
    """Inverse of compress_24: the dense (rows, K) weight with exact zeros. trusted skips the metadata's check,
    for a caller that decompresses on every call a weight checked when it was made (the check synchronizes
    with a GPU)."""
    _check_matrix("decompress_24", "values", values)
    _check_same_device("decompress_24", values, meta)
    rows, half = values.shape
    if half % 16 or meta.dtype != torch.int32 or meta.shape != (rows, half // 16):
        raise ValueError(f"decompress_24: needs values (rows, K/2) with K % 32 == 0 and int32 meta (rows, K/32); "
                         f"got values {tuple(values.shape)}, meta {tuple(meta.shape)} {meta.dtype}")
    if not trusted:
        check_meta(meta, "decompress_24")
    if not _use_triton(values, values.dtype in _KERNEL_DTYPES):
        return _row_blocks(reference.decompress_24, values, meta)
    with _device_of(values):
        return _kernel("compress").decompress_24(values, meta)


def check_meta(meta, what):
    """Raise, naming `what` and the first bad group, unless every 4-bit entry of the int32 meta names two
    kept columns, the lower first: anything else is no 2:4 layout, and the backends would read it differently.
    Skipped while compiling and inside CUDA-graph capture: the data-dependent check would break a compiled
    graph, and cannot synchronize in capture."""
    if torch.compiler.is_compiling() or (meta.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if meta.is_meta:  # no values to check (a skeleton's layers on the meta device)
        return
    if _pairs_ordered(meta):
        return
    nibbles = reference.meta_nibbles(meta)  # find the first bad group for the message
    bad = (nibbles & 3) >= (nibbles >> 2)
    if bad.any():
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what}: meta is not a 2:4 layout: row {row}, group {group} (columns {4 * group}-"
                         f"{4 * group + 3}) holds {int(nibbles[row, group]):#06b}, "
                         "not two kept column indices, the lower first")


def _pairs_ordered(meta):
    """Whether every 4-bit entry i0 | i1 << 2 of the int32 meta has i0 < i1: all eight per word at once
    (loading a large checkpoint checks millions of words). In each 4-bit lane, 8 + i1 - i0 - 1 has bit 3
    set exactly when i1 > i0, and stays within 4..10, so no lane borrows from or carries into the next."""
    word = meta.to(torch.int64)
    low, high = word & 0x33333333, (word >> 2) & 0x33333333
    lanes = (high | 0x88888888) - low - 0x11111111
    return bool(((lanes & 0x88888888) == 0x88888888).all())


def _row_blocks(function, *matrices):
    """function(*matrices) (a reference that works row by row), computed a block of rows at a time into outputs of all
    the rows: the references' temporaries held some 13x a bf16 weight in a compress (int64 indices; 1.1 GB for
    11008x4096 on the CPU, where they are the engine's path) and 2x an fp32 one in Wanda; a block's are a few tens of
    MB. None stays None."""
    rows, cols = matrices[0].shape
    step = max(1, _REFERENCE_BLOCK // max(cols, 1))
    if rows <= step:
        return function(*matrices)
    outs = None
    for start in range(0, rows, step):
        parts = function(*(m if m is None else m[start:start + step] for m in matrices))
        parts = parts if isinstance(parts, tuple) else (parts,)
        if outs is None:
            outs = tuple(part.new_empty((rows, *part.shape[1:])) for part in parts)
        for out, part in zip(outs, parts):
            out[start:start + step] = part
    return outs if len(outs) > 1 else outs[0]


def _kernel(name):
    """The Triton module `name`, imported on first use (importing it imports triton)."""
    return importlib.import_module(f".{name}", __name__)


def _m_covered(nm):
    return not nm or (nm[1] <= _MAX_M and nm[1] & (nm[1] - 1) == 0)


def _check_matrix(fn, name, t):
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        dtype = t.dtype if isinstance(t, torch.Tensor) else ""
        raise ValueError(f"{fn}: {name} must be a 2-D float tensor, got {shape} {dtype}")


def _check_same_device(fn, a, b):
    if not isinstance(b, torch.Tensor) or b.device != a.device:
        where = b.device if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"{fn}: inputs must be tensors on one device, got {a.device} and {where}")


def _check_pattern(fn, cols, sparsity, nm):
    if nm:
        if not (isinstance(nm, (tuple, list)) and len(nm) == 2):
            raise ValueError(f"{fn}: nm must be a pair (N, M), got {nm!r}")
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
            raise ValueError(f"{fn}: N:M needs integers 0 <= N <= M, got {n}:{m}")
        if cols % m:
            raise ValueError(f"{fn}: {cols} columns are not divisible by M={m} for an {n}:{m} pattern")
    elif isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"{fn}: sparsity must be in [0, 1], got {sparsity!r}")


if __name__ == "kernels":  # imported as a top-level module from the checkout's root: see _shadow.py
    from ._shadow import hand_over

    hand_over(__name__)
