"""Every pruning method through the pipeline with the layer on a CUDA device (run by the GPU suite, skipped
without a GPU): it runs, the pattern holds, the model is left on its own device, the report has GPU memory,
and the per-layer calibration errors are close to the same run on the CPU. Close, not equal: on CUDA the
masks come from the Triton kernels and the learned methods accumulate in another order."""
import pytest
import torch

import sdsengine
from sdsengine.config import BESAConfig, MagnitudeConfig, SDSConfig, SparseGPTConfig, WandaConfig
from sdsengine.masks import counted_sparsity, nm_violations
from sdsengine.pipeline import adapters
from tiny_models import tiny_model, tiny_tokens

DEVICE = "cuda"
ONE_SHOT, LEARNED = 0.1, 0.3  # relative tolerance on each layer's error against the CPU run's

CONFIGS = {  # name -> (config for a device, tolerance)
    "magnitude 4:8": (lambda d: MagnitudeConfig(sparsity="4:8", device=d), ONE_SHOT),
    "wanda 2:4": (lambda d: WandaConfig(sparsity="2:4", device=d), ONE_SHOT),
    "wanda 50%": (lambda d: WandaConfig(sparsity="0.5", device=d), ONE_SHOT),
    "sparsegpt 2:4": (lambda d: SparseGPTConfig(sparsity="2:4", blocksize=16, device=d), ONE_SHOT),
    "sparsegpt 50% refit": (lambda d: SparseGPTConfig(sparsity="0.5", blocksize=16, refit=10, device=d), ONE_SHOT),
    "sds sparsegpt 2:4": (lambda d: SDSConfig(sparsity="2:4", blocksize=16, iters=20, refit=10, device=d), LEARNED),
    "sds wanda 50%": (lambda d: SDSConfig(base="wanda", sparsity="0.5", iters=20, refit=10, device=d), LEARNED),
    "besa 50%": (lambda d: BESAConfig(sparsity="0.5", device=d), LEARNED),
    "besa 2:4": (lambda d: BESAConfig(sparsity="2:4", device=d), LEARNED),
}


def _prune(name, device, model=None):
    model = tiny_model("llama") if model is None else model
    config = CONFIGS[name][0](device)
    return model, config, sdsengine.prune(model, config, tiny_tokens(4, 32), progress=False)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_on_the_gpu_matches_the_cpu(name):
    # the run's own peak above what earlier tests left allocated (the reset sets the peak to that, not to 0)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, config, result = _prune(name, DEVICE)
    assert torch.cuda.max_memory_allocated() > before, "nothing was put on the GPU"
    _, _, on_cpu = _prune(name, "cpu")
    pattern = config.sparsity
    for layer in adapters.decoder_layers(model):
        for linear, module in adapters.linear_modules(layer).items():
            w = adapters.get_weight(module)
            assert w.device.type == "cpu", f"{linear} was left on {w.device}"
            if pattern.nm:
                assert nm_violations(w, *pattern.nm) == 0, linear
            else:
                assert counted_sparsity(w) == pytest.approx(pattern.sparsity, abs=0.02), linear
    assert result.report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "gpu_peak_allocated_gib" in result.report["memory"]  # rounded to MiB: a tiny model's may read 0
    errors = [r.error for r in result.layers]
    expected = [r.error for r in on_cpu.layers]
    if errors[0] is not None:  # methods without data (magnitude) report none
        assert errors == pytest.approx(expected, rel=CONFIGS[name][1])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["magnitude 4:8", "sparsegpt 2:4"])
def test_a_model_on_the_gpu_stays_there(name):
    """Every parameter and buffer (the rotary embedding's has no parameters) ends where it started."""
    model = tiny_model("llama").to(DEVICE)
    _prune(name, DEVICE, model)
    moved = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
    assert not moved, f"left off the GPU: {moved}"
