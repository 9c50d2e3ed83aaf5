"""The only place that decides what runs where: GPU tests skip without CUDA; Triton kernels run under
the interpreter on CPU (TRITON_INTERPRET must be set before triton is imported). In the GPU suite
(SDSENGINE_GPU_SUITE=1) a missing GPU is an error, and every skip is written down (SDSENGINE_SKIPS), so that
tests that skipped are never reported as passed."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# the offline data beside the checkout, as `make test` sets it (Makefile): a bare `pytest` then runs alike, and
# the CLI's checks before a model load (without a data directory: is `datasets` there to read the hub?) pass
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("SDSENGINE_DATA_DIR", str(_SHARED_DATA))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by the GPU suite)")
    config.addinivalue_line("markers", "slow: real-model or large-shape test")
    if os.environ.get("SDSENGINE_GPU_SUITE") == "1" and not HAS_CUDA:
        raise pytest.UsageError("SDSENGINE_GPU_SUITE=1 (the GPU suite), but torch sees no CUDA device: every GPU "
                                "test would skip")


def pytest_terminal_summary(terminalreporter):
    """Where SDSENGINE_SKIPS names a file: each skipped test and why, one per line (node id, tab, reason), added to
    what it holds (the GPU suite's gpu_tests step is two pytest runs; the suite removes the file first)."""
    path = os.environ.get("SDSENGINE_SKIPS")
    if not path or hasattr(terminalreporter.config, "workerinput"):  # an xdist worker: its controller writes them
        return
    lines = []
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = " ".join(reason.removeprefix("Skipped: ").split())  # one line
        lines.append(f"{report.nodeid}\t{reason}\n")
    with open(path, "a") as f:
        f.write("".join(lines))


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
