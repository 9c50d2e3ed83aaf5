"""The calibration activations' size, known before any work, and the refusal when they cannot fit."""
import pytest
import torch

import sdsengine
from sdsengine.config import SDSConfig, WandaConfig
from sdsengine.pipeline import adapters, memory
from sdsengine.pipeline.capture import capture_layer_inputs
from tiny_models import tiny_model, tiny_tokens

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_equals_the_captured_buffers(family, dtype):
    model = tiny_model(family).to(dtype)
    samples = tiny_tokens(3, 16)
    inps, _ = capture_layer_inputs(model, samples, CPU, CPU)
    buffer = inps.numel() * inps.element_size()
    assert memory.activation_bytes(model, 3, 16, dense_stream=False) == 2 * buffer
    assert memory.activation_bytes(model, 3, 16, dense_stream=True) == 4 * buffer


def _weights(model):
    return [adapters.get_weight(m).clone() for layer in adapters.decoder_layers(model)
            for m in adapters.linear_modules(layer).values()]


@pytest.mark.parametrize("config, buffers", [(WandaConfig(sparsity="2:4"), 2),
                                             (SDSConfig(sparsity="2:4", base="wanda", iters=2, teacher="dense"), 4)])
def test_refused_before_any_work_when_they_cannot_fit(monkeypatch, config, buffers):
    """With room for exactly the buffers the method keeps it runs; one byte less and it stops, naming the
    sizes and the remedy, with the model untouched. Wanda keeps two buffers, SDS with the
    dense teacher four (the dense stream)."""
    samples = tiny_tokens(4, 32)
    model = tiny_model("llama")
    need = buffers * 4 * 32 * model.config.hidden_size * 4
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    before = _weights(model)
    with pytest.raises(ValueError, match=r"calibration activations need .* MiB on cpu .*4 windows x 32 tokens.*--nsamples"):
        sdsengine.prune(model, config, samples, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    sdsengine.prune(model, config, samples, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(model)))


def test_sizes_read_in_mib_or_gib():
    assert memory.describe(3 * 2 ** 20) == "3.0 MiB"
    assert memory.describe(5 * 2 ** 29) == "2.50 GiB"


def test_unknown_free_memory_does_not_refuse(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    memory.check_fits(10 ** 15, CPU, (128, 2048))


def test_host_free_memory_is_read():
    free = memory.available_bytes(CPU)
    assert free is None or free > 0
