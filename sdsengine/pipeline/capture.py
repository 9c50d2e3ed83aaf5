"""Capture what the decoder layers receive, so layers can be replayed one at a time.

Every decoder layer is swapped for a recorder that passes its input through unchanged: the model's forward
then runs its own set-up (embeddings, rotary tables, one attention mask per kind of layer) at the cost of
the embeddings alone. Layer 0's recorder keeps the hidden states; each layer's keeps its keyword arguments,
once: all calibration windows have the same length (windows of several lengths, a zero-shot task's inputs, are
captured as one group per length: capture_groups). Per layer, because some families give layers different
masks (Gemma 2/3 alternate sliding-window and full attention). The KV cache is dropped (see PITFALLS: a cache
replayed across samples makes every sample attend to the previous ones).

The hidden states go straight into one buffer of all windows, allocated at the first window. Collecting
the windows and concatenating them held the activations twice, and that set a whole prune's peak memory:
SparseGPT 4:8 on SmolLM2-135M at 128 x 2048 windows peaked at 2.76 GiB that way, 2.42 GiB with one buffer.
"""
import torch
from torch import nn

from . import adapters, placement


class _Stop(Exception):
    pass


class _Inputs:
    """Layer 0's inputs, window by window, written into one (windows, *hidden shape) buffer on the store
    device that the first window sizes."""

    def __init__(self, windows, store_device):
        self.windows, self.store, self.buffer, self.window = windows, store_device, None, 0

    def add(self, hidden_states):
        if self.buffer is None:
            self.buffer = torch.empty((self.windows, *hidden_states.shape[1:]), dtype=hidden_states.dtype,
                                      device=self.store)
        self.buffer[self.window:self.window + 1].copy_(hidden_states)
        self.window += 1


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records its keyword arguments (the first window's only: later
    ones hold the same values, and keeping every window's masks would cost memory), layer 0's also the
    hidden states, into `group`; passes the hidden states on, and the last layer's stops the forward (the
    head is moot)."""

    def __init__(self, layer, index, last, group):
        super().__init__()
        self.index, self.last, self.group = index, last, group
        # some models' forward reads it to pick this layer's mask
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.group.inputs.add(hidden_states)
        self.group.kwargs.setdefault(self.index, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


class _Group:
    """What the recorders write into: the current group of windows' inputs and keyword arguments."""

    def __init__(self):
        self.inputs, self.kwargs = None, None

    def begin(self, windows, store_device):
        self.inputs, self.kwargs = _Inputs(windows, store_device), {}


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
def capture_layer_inputs(model, samples, device, store_device, weights=None):
    """Run `samples` (nsamples, seqlen) through the model's set-up; returns (layer 0's inputs on
    store_device, one dict of keyword arguments per decoder layer). weights: as placement.visiting's."""
    return capture_groups(model, [samples], device, store_device, weights)[0]


@torch.no_grad()
def capture_groups(model, groups, device, store_device, weights=None):
    """capture_layer_inputs of each of `groups` (a list of (windows, seqlen) ids, the length differing from group to
    group, and with it the masks and positions), the model's set-up lent its weights once for all of them."""
    layers = adapters.decoder_layers(model)
    group, captured = _Group(), []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, i == len(originals) - 1, group)
    try:
        with placement.visiting(adapters.pre_layer_modules(model), device, weights):
            for samples in groups:
                group.begin(samples.shape[0], store_device)
                for row in samples:
                    try:
                        model(row.unsqueeze(0).to(device), use_cache=False)
                    except _Stop:
                        pass
                captured.append((group.inputs.buffer, [_replay_kwargs(group.kwargs[i]) for i in range(len(originals))]))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return captured


def _replay_kwargs(kwargs):
    kwargs = dict(kwargs)
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):  # the KV cache, by its names
        kwargs.pop(name, None)                                                # across transformers versions
    kwargs["use_cache"] = False
    return kwargs
