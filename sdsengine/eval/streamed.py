"""Perplexity of a model larger than the host's memory, a decoder layer at a time from its checkpoint
(`sdsengine eval --stream-weights`, `sdsengine.eval.runner.evaluate_checkpoint`).

The model is a skeleton lent its weights by a streaming.WeightStream, as the streamed prune is. Every evaluation
window goes through the model's set-up (embeddings, rotary tables, masks: capture.py), then through each decoder layer
in turn, its weights read for its turn: one buffer holds every window's hidden states, each layer's outputs written
over its inputs. Last, the model's own forward runs again with its decoder layers replaced by stand-ins that hand on
each window's final hidden states (and its input embeddings by zeros: not read again beside the head), so that what
follows the layers (final norm, head, a family's logit scaling or soft-capping) is the model's own code, not a copy.
The windows then score as perplexity.py scores them.
"""
import contextlib
import sys

import torch
from torch import nn
from tqdm import tqdm

from sdsengine.pipeline import adapters, memory, placement
from sdsengine.pipeline.capture import capture_layer_inputs, to_device
from sdsengine.pipeline.sequential import run_layer


@contextlib.contextmanager
def final_states(model, windows, weights, device, progress=True):
    """Inside the block, `model` (a skeleton) run on each of `windows` (n, seqlen) in order, one window per call,
    gives the logits the loaded model gives: its decoder layers are stand-ins that return each window's final hidden
    states, computed here a layer at a time, and what runs outside them is lent its weights from `weights`."""
    device = torch.device(device)
    need = memory.buffer_bytes(model, *windows.shape)
    store = memory.store_device(device, need)
    memory.check_fits(need, store, tuple(windows.shape))
    if progress:
        print(f"evaluation activations: {memory.describe(need)} on {store}", file=sys.stderr)
    hidden, layer_kwargs = capture_layer_inputs(model, windows, device, store, weights)
    layers = adapters.decoder_layers(model)
    returned = []  # whether each call of a layer returned a tuple
    for layer, kwargs in zip(tqdm(layers, desc="layers", unit="layer", disable=not progress), layer_kwargs):
        with placement.visiting([layer], device, weights), _returns_noted(layer, returned):
            run_layer(layer, hidden, hidden, to_device(kwargs, device), device)  # each window's outputs over its inputs
    originals, embeddings = list(layers), model.get_input_embeddings()
    feed = _Feed(hidden, device, any(returned))
    for i in range(len(layers)):
        layers[i] = _StandIn(feed, first=i == 0, attention_type=getattr(originals[i], "attention_type", None))
    model.set_input_embeddings(_NoEmbeddings(embeddings))
    try:
        with placement.visiting(_outside_layers(model), device, weights):
            yield
    finally:
        model.set_input_embeddings(embeddings)
        for i, layer in enumerate(originals):
            layers[i] = layer


@contextlib.contextmanager
def _returns_noted(layer, returned):
    """Inside the block, each call of `layer` appends to `returned` whether it returned a tuple: what the model's
    forward expects of its layers (some families take [0] of their output, others the tensor itself)."""
    handle = layer.register_forward_hook(lambda module, args, out: returned.append(isinstance(out, (tuple, list))))
    try:
        yield
    finally:
        handle.remove()


class _Feed:
    """The windows' final hidden states, handed out one window per forward call, in order."""

    def __init__(self, hidden, device, as_tuple):
        self.hidden, self.device, self.as_tuple, self.window = hidden, device, as_tuple, -1

    def current(self):
        h = self.hidden[self.window:self.window + 1].to(self.device)
        return (h,) if self.as_tuple else h


class _StandIn(nn.Module):
    """Stands in for a decoder layer: returns the current window's final hidden states, whatever it is given (the
    first layer's stand-in moves on to the next window), so the model's forward carries them to its head."""

    def __init__(self, feed, first, attention_type):
        super().__init__()
        self.feed, self.first = feed, first
        self.attention_type = attention_type  # some models' forward reads it to pick this layer's mask

    def forward(self, hidden_states, *args, **kwargs):
        if self.first:
            self.feed.window += 1
        return self.feed.current()


class _NoEmbeddings(nn.Module):
    """Stands in for the input embeddings once the final states are known: the layers' stand-ins drop what they are
    given, so zeros of the embeddings' shape do, and the embeddings (vocabulary x hidden: as large as the head) are not
    read again beside the head."""

    def __init__(self, embeddings):
        super().__init__()
        self.width, self.dtype = embeddings.embedding_dim, embeddings.weight.dtype

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.width, dtype=self.dtype, device=ids.device)


def _outside_layers(model):
    """The modules outside the decoder layers that hold parameters or buffers (the layers being stand-ins now), none
    inside another: each is lent its weights and moved to the device once."""
    holders = [m for m in model.modules() if any(t is not None for t in (*m._parameters.values(),
                                                                         *m._buffers.values()))]
    inside = {id(s) for m in holders for s in m.modules() if s is not m}
    return [m for m in holders if id(m) not in inside]
