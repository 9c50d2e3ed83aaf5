"""The backend switch of sdsengine.kernels: what runs where, input checks, and the interpreter set-up."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import sdsengine.kernels as kernels
from sdsengine.kernels import compress_24, decompress_24, sparsegpt_block, use_backend, wanda_prune


def test_interpreter_is_set_before_triton_loads():
    """conftest sets TRITON_INTERPRET after importing torch: that is in time only if neither torch nor the
    package imports triton."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    code = "import sys, torch, sdsengine.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


AUTO_CALLS = 0 if torch.cuda.is_available() else 1  # auto: Triton on CUDA, the reference on CPU


@pytest.mark.parametrize("backend,expected_calls", [("triton", 0), ("torch", 1), ("auto", AUTO_CALLS)])
def test_backend_choice(reference_calls, backend, expected_calls):
    calls = reference_calls("wanda_prune")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_backend(backend):
        wanda_prune(torch.randn(2, 32, device=device), torch.ones(32, device=device), nm=(2, 4))
    assert len(calls) == expected_calls


def test_uncovered_inputs_take_the_reference(monkeypatch, reference_calls):
    """float64, M = 3 (not a power of 2): same answer, from the reference, without triton."""
    calls = reference_calls("wanda_prune")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with use_backend("triton"):
        wanda_prune(torch.randn(2, 32, dtype=torch.float64), torch.ones(32), nm=(2, 4))
        wanda_prune(torch.randn(2, 33), torch.ones(33), nm=(1, 3))
    assert len(calls) == 2


def test_forced_triton_without_triton_says_so(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        compress_24(torch.randn(2, 32))
    with use_backend("auto"):  # auto never needs it: CPU tensors take the reference
        compress_24(torch.randn(2, 32))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compress_24(torch.randn(2, 32))


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False)])
def test_an_interpreter_that_cannot_run_is_named(monkeypatch, triton_version, numpy_version, refused):
    """Triton 3.6's interpreter fails inside every kernel with a runtime loop bound under NumPy 2.4 ("only
    0-dimensional arrays can be converted"): refused up front, with the fix, before any kernel runs."""
    triton = pytest.importorskip("triton")
    import numpy
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    assert (kernels._interpreter_problem() is not None) == refused
    if refused and not torch.cuda.is_available():
        with use_backend("triton"), pytest.raises(RuntimeError, match=r"numpy<2.4 or triton>=3.7"):
            compress_24(torch.randn(2, 32))


def test_bad_backend_name():
    with use_backend("cuda"), pytest.raises(ValueError, match="'cuda'"):
        compress_24(torch.randn(2, 32))


@pytest.mark.parametrize("call,message", [
    (lambda: wanda_prune(torch.randn(4), torch.ones(4)), r"weight must be a 2-D float tensor, got \(4,\)"),
    (lambda: wanda_prune(torch.randn(2, 8), torch.ones(6)), r"act_norm must be a float vector of 8"),
    (lambda: wanda_prune(torch.randn(2, 10), torch.ones(10), nm=(2, 4)), r"10 columns are not divisible by M=4"),
    (lambda: wanda_prune(torch.randn(2, 8), torch.ones(8), nm=(5, 4)), r"0 <= N <= M, got 5:4"),
    (lambda: wanda_prune(torch.randn(2, 8), torch.ones(8), sparsity=1.5), r"sparsity must be in \[0, 1\], got 1.5"),
    (lambda: wanda_prune(torch.randn(2, 8), torch.ones(2, 4)), r"act_norm must be a float vector of 8.*\(2, 4\)"),
    (lambda: wanda_prune(torch.randn(2, 8), torch.ones(8), sparsity="0.5"), r"sparsity must be in \[0, 1\], got '0.5'"),
    (lambda: wanda_prune(torch.randn(2, 8), torch.ones(8), nm=(2,)), r"nm must be a pair \(N, M\), got \(2,\)"),
    (lambda: wanda_prune(torch.randint(0, 3, (2, 8)), torch.ones(8)), r"2-D float tensor, got \(2, 8\) torch.int64"),
    (lambda: sparsegpt_block(torch.randn(3, 8), torch.eye(6)), r"\(8, 8\) matrix for a block of 8 columns"),
    (lambda: sparsegpt_block(torch.randn(3, 6), torch.eye(6), nm=(2, 4)), r"6 columns are not divisible by M=4"),
    (lambda: compress_24(torch.randn(2, 48)), r"divisible by 32, got 48"),
    (lambda: compress_24(torch.randn(2, 32), torch.randn(2, 64)), r"shaped like weight \(2, 32\), got \(2, 64\)"),
    (lambda: decompress_24(torch.randn(2, 16), torch.zeros(2, 2, dtype=torch.int32)),
     r"values \(2, 16\), meta \(2, 2\)"),
    (lambda: decompress_24(torch.randn(2, 16), torch.zeros(2, 1)), r"meta \(2, 1\) torch.float32"),
    (lambda: decompress_24(torch.randn(2, 16), torch.tensor([[0x44444444], [0x44444404]], dtype=torch.int32)),
     r"meta is not a 2:4 layout: row 1, group 1 \(columns 4-7\) holds 0b0000"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_input_errors_name_the_values(call, message, backend):
    with use_backend(backend), pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_trusted_decompression_skips_the_metadata_check(backend, monkeypatch, device):
    """A lean SparseLinear decompresses on every call a weight checked once: no GPU synchronization per call."""
    checked = []
    monkeypatch.setattr(kernels, "check_meta", lambda meta, what: checked.append(what))
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0], device=device).repeat(8)
    values, meta = compress_24(torch.randn(2, 32, device=device) * keep)
    with use_backend(backend):
        decompress_24(values, meta, trusted=True)
        assert checked == []
        decompress_24(values, meta)
        assert checked == ["decompress_24"]



@pytest.mark.parametrize("lane", range(8))
def test_the_metadata_check_reads_every_entry_of_a_word(lane):
    """check_meta tests all eight 4-bit entries of a word at once: each of the 16 values, in each place of
    an otherwise valid word, is accepted exactly when it names two columns, the lower first."""
    for entry in range(16):
        word = (0x44444444 & ~(0xF << 4 * lane)) | (entry << 4 * lane)
        meta = torch.tensor([[0x44444444, word - (1 << 32 if word >= 1 << 31 else 0)]], dtype=torch.int32)
        assert kernels._pairs_ordered(meta) == ((entry & 3) < (entry >> 2))  # the fast path decides
        if (entry & 3) < (entry >> 2):
            kernels.check_meta(meta, "word")
        else:
            with pytest.raises(ValueError, match=f"row 0, group {8 + lane} .* holds {entry:#06b}"):
                kernels.check_meta(meta, "word")


def test_no_kernel_is_differentiable_on_either_backend(both_backends, device):
    """One contract for both backends: outputs never require grad (the reference kept autograd where the
    Triton path dropped it, so the same call was differentiable on the CPU and detached on a GPU)."""
    from sdsengine.kernels import compress_24, decompress_24, sparsegpt_block, wanda_prune
    w = torch.randn(8, 32, device=device, requires_grad=True)
    calls = (lambda: wanda_prune(w, torch.rand(32, device=device), nm=(2, 4)), lambda: compress_24(w),
             lambda: sparsegpt_block(w[:, :4], torch.eye(4, device=device), nm=(2, 4)),
             lambda: decompress_24(*(t.detach() for t in compress_24(w))))
    for call in calls:
        for outputs in both_backends(call):
            assert not any(t.requires_grad for t in outputs if isinstance(t, torch.Tensor)) and \
                not (isinstance(outputs, torch.Tensor) and outputs.requires_grad)


def test_empty_inputs_agree(both_backends, assert_exact, device):
    """A weight of no rows decompresses on the reference too (its reshape could not infer a size), and a
    block of no columns loses nothing (the kernel's losses were uninitialized memory)."""
    from sdsengine.kernels import compress_24, decompress_24, sparsegpt_block
    values, meta = compress_24(torch.randn(0, 32, device=device))
    fast, ref = both_backends(lambda: decompress_24(values, meta))
    assert_exact(fast, ref)
    assert fast.shape == (0, 32)
    fast, ref = both_backends(lambda: sparsegpt_block(torch.randn(16, 0, device=device),
                                                      torch.zeros(0, 0, device=device)))
    assert_exact(fast[2], ref[2], "losses")
    assert not fast[2].any()


def test_meta_device_metadata_is_not_read_and_mismatched_errors_are_refused():
    """A skeleton's layers on the meta device hold no values to check (the check read them and failed);
    relative_error of two shapes would broadcast and compare something else."""
    from sdsengine import ops
    from sdsengine.kernels import check_meta
    check_meta(torch.empty(4, 2, dtype=torch.int32, device="meta"), "a skeleton")
    with pytest.raises(ValueError, match=r"relative_error: shapes differ, \(4, 1\) against \(4,\)"):
        ops.relative_error(torch.ones(4, 1), torch.ones(4))
