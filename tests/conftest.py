"""The only place that decides what runs where: GPU tests skip without CUDA; Triton kernels run under
the interpreter on CPU (TRITON_INTERPRET must be set before triton is imported)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by the GPU suite)")
    config.addinivalue_line("markers", "slow: real-model or large-shape test")


@pytest.fixture
def fresh_choices():
    """SparseLinear's autotune cache empty before the test and after it (tests that tune or read choices)."""
    from sdsengine.nn import sparse_linear
    sparse_linear.clear_autotune_cache()
    yield
    sparse_linear.clear_autotune_cache()


# Run before every other test: the wgmma kernel's cases in child processes. A pipeline that fails one is then
# turned off for the session, before any in-process test could run it and lose the CUDA context (test_ops.py).
FIRST = ("test_wgmma_kernel_against_fp32",)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:  # the marker, not a name or id "gpu"
            item.add_marker(skip_gpu)
    items.sort(key=lambda item: getattr(item, "originalname", item.name) not in FIRST)  # stable: the rest keep order
