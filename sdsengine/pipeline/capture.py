"""Capture what the first decoder layer receives, so layers can be replayed one at a time.

The model runs up to the first layer, which is swapped for a catcher that records its inputs and stops
the forward pass. The keyword arguments (position embeddings, masks) are kept once: all calibration
windows have the same length. The KV cache is dropped (see PITFALLS: a cache replayed across samples
makes every sample attend to the previous ones).
"""
import torch
from torch import nn

from . import adapters


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, layer, sink):
        super().__init__()
        self.layer, self.sink = layer, sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, kwargs))
        raise _Stop


def to_device(obj, device):
    """Move every tensor inside nested tuples/lists/dicts."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model, samples, device, store_device):
    """Run `samples` (nsamples, seqlen) up to layer 0; returns (inputs on store_device, layer kwargs)."""
    layers = adapters.decoder_layers(model)
    sink = []
    first = layers[0]
    layers[0] = _Catcher(first, sink)
    moved = adapters.pre_layer_modules(model)
    originals = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)
    try:
        for row in samples:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = first
        for m, d in zip(moved, originals):
            m.to(d)
    inputs = torch.cat([h.to(store_device) for h, _ in sink])
    return inputs, _replay_kwargs(sink[0][1])


def _replay_kwargs(kwargs):
    kwargs = dict(kwargs)
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs.pop("layer_past", None)
    kwargs["use_cache"] = False
    return kwargs
