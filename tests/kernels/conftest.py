"""Checks shared by the kernel tests. Policy: masks, metadata and copied values compare exactly; computed
floats against the fp32 reference within a stated tolerance. Failures say where they differ."""
import pytest
import torch

from sdsengine.kernels import reference, use_backend


def _assert_exact(actual, expected, what="tensor"):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: got {tuple(actual.shape)} {actual.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
    same = actual == expected
    if actual.is_floating_point():
        same |= actual.isnan() & expected.isnan()
    if not same.all():
        bad = (~same).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {len(bad)} of {same.numel()} entries differ, first at {first}: "
                             f"{actual[first].item()} vs {expected[first].item()}")


@pytest.fixture
def assert_exact():
    return _assert_exact


@pytest.fixture
def device():
    """Where the kernels run: CUDA when there is one, else the CPU under the Triton interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


KERNEL_FUNCTIONS = ("wanda_prune", "sparsegpt_block", "compress_24", "decompress_24", "nm_mask")


@pytest.fixture
def both_backends(monkeypatch):
    """fn -> (output under Triton, output under the torch reference). The Triton run must call no reference
    function: a kernel that fell back to the reference would otherwise be compared with itself."""
    called = []
    for name in KERNEL_FUNCTIONS:
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, _n=name, **k: called.append(_n) or _f(*a, **k))

    def run(fn):
        called.clear()
        with use_backend("triton"):
            fast = fn()
        assert not called, f"under the Triton backend the reference {called} ran instead of the kernel"
        with use_backend("torch"):
            return fast, fn()
    return run


@pytest.fixture
def reference_calls(monkeypatch):
    """fn_name -> a list that grows by one at each call of that PyTorch reference (which still runs)."""
    def count(fn_name):
        calls, original = [], getattr(reference, fn_name)
        monkeypatch.setattr(reference, fn_name, lambda *a, **k: calls.append(1) or original(*a, **k))
        return calls
    return count
