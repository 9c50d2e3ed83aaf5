import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdsengine.eval import tasks


@pytest.fixture
def hub(monkeypatch):
    """In place of the hub (no network in tests): serves the rows set in `hub.rows` to every task and
    records what each load asked for in `hub.calls`. No data directory is set."""
    class FakeHub:
        def __init__(self):
            self.rows, self.calls = [], []

        def __call__(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            return list(self.rows)
    fake = FakeHub()
    monkeypatch.setattr(tasks, "hub_dataset", fake)
    monkeypatch.delenv("SDSENGINE_DATA_DIR", raising=False)
    return fake


@pytest.fixture(scope="module")
def model():
    """A one-layer Llama over a 64-token vocabulary, random weights."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()
