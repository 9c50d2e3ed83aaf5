"""Perplexity and zero-shot log-likelihoods of a model larger than the host's memory, a decoder layer at a time from
its checkpoint (`sdsengine eval --stream-weights`, `sdsengine.eval.runner.evaluate_checkpoint`).

The model is a skeleton lent its weights by a streaming.WeightStream, as the streamed prune is. Every evaluation
window (a zero-shot request's tokens are a window of their own length) goes through the model's set-up (embeddings,
rotary tables, masks: capture.py), then through each decoder layer in turn, its weights read once for its turn: one
buffer per window length holds those windows' hidden states, each layer's outputs written over its inputs. Last, the
model's own forward runs again, once per window, with its decoder layers replaced by stand-ins that hand on that
window's final hidden states (and its input embeddings by zeros: not read again beside the head), so that what follows
the layers (final norm, head, a family's logit scaling or soft-capping) is the model's own code, not a copy. The
windows then score as perplexity.py and zeroshot.py score them. Several tasks run in one such pass (the layers' weights
read once, not once per task: `one_pass`) where their windows' hidden states fit; each task's own final_states then
hands on its windows from it.
"""
import contextlib
import sys

import torch
from torch import nn
from tqdm import tqdm

from sdsengine.pipeline import adapters, memory, placement
from sdsengine.pipeline.capture import capture_groups, to_device
from sdsengine.pipeline.sequential import run_layer


@contextlib.contextmanager
def final_states(model, groups, weights, device, progress=True):
    """Inside the block, `model` (a skeleton) run on each window of `groups` (a list of (windows, seqlen) ids, the
    length differing from group to group), one window per call, group after group, gives the logits the loaded model
    gives: its decoder layers are stand-ins that return each window's final hidden states, computed here a layer at a
    time, and what runs outside them is lent its weights from `weights`."""
    layers = adapters.decoder_layers(model)
    if layers and isinstance(layers[0], _StandIn):  # inside a pass over several tasks' windows: these are next in it
        layers[0].feed.check_next(groups)
        yield
        return
    device = torch.device(device)
    need, store = _kept(model, groups, device)
    windows, tokens = sum(ids.shape[0] for ids in groups), sum(ids.numel() for ids in groups)
    memory.check_fits(need, store, f"the hidden states of {windows} evaluation windows ({tokens} tokens)",
                      "lower --limit (or --seqlen)")
    if progress:
        print(f"evaluation activations: {memory.describe(need)} on {store}", file=sys.stderr)
    captured = capture_groups(model, groups, device, store, weights)
    returned = []  # whether each call of a layer returned a tuple
    for i, layer in enumerate(tqdm(layers, desc="layers", unit="layer", disable=not progress)):
        with placement.visiting([layer], device, weights), _returns_noted(layer, returned):
            for hidden, layer_kwargs in captured:  # each window's outputs over its inputs
                run_layer(layer, hidden, hidden, to_device(layer_kwargs[i], device), device)
    originals, embeddings = list(layers), model.get_input_embeddings()
    feed = _Feed([hidden for hidden, _ in captured], device, any(returned))
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


def one_pass(model, groups, weights, device, progress=True):
    """final_states over `groups` (the windows of several tasks, in the order the tasks run) where their hidden states
    fit in half the memory they would be kept in (the rest is for the layers and the tasks' work), so the layers are
    read once for all of them; else nothing, and each task makes its own pass (its windows alone must fit)."""
    need, store = _kept(model, groups, torch.device(device))
    free = memory.available_bytes(store)
    if free is not None and need > free / 2:
        return contextlib.nullcontext()
    return final_states(model, groups, weights, device, progress)


def _kept(model, groups, device):
    """(bytes, device) of the hidden states of `groups`' windows, kept between layers: on `device` where they fit in
    half its free memory, else on the host."""
    need = sum(memory.buffer_bytes(model, *ids.shape) for ids in groups)
    return need, memory.store_device(device, need)


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
    """The windows' final hidden states (a list of (windows, seqlen, hidden) buffers), handed out one window per
    forward call, in order."""

    def __init__(self, groups, device, as_tuple):
        self.device, self.as_tuple = device, as_tuple
        self.windows = [hidden[w:w + 1] for hidden in groups for w in range(hidden.shape[0])]
        self.window = -1

    def advance(self, given):
        """Move on to the next window; `given`: what the forward gave the first layer, for its shape."""
        self.window += 1
        if self.window >= len(self.windows) or given.shape[:2] != self.windows[self.window].shape[:2]:
            raise RuntimeError(f"the forward's call {self.window} gives the decoder layers {tuple(given.shape[:2])} "
                               "(batch, tokens), not the window computed for it: the windows must be run in the order "
                               "they were computed, one per call")

    def check_next(self, groups):
        """Refuse unless the windows of `groups` ((windows, seqlen) ids each) are the next ones this feed hands on."""
        start = self.window + 1
        lengths = [ids.shape[1] for ids in groups for _ in range(ids.shape[0])]
        if [w.shape[1] for w in self.windows[start:start + len(lengths)]] != lengths:
            raise RuntimeError(f"a task's {len(lengths)} windows are not the next ones of the pass over several tasks' "
                               f"windows (from window {start} of {len(self.windows)})")

    def current(self):
        h = self.windows[self.window].to(self.device)
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
            self.feed.advance(hidden_states)
        return self.feed.current()


class _NoEmbeddings(nn.Module):
    """Stands in for the input embeddings once the final states are known: the layers' stand-ins drop what they are
    given, so zeros of the embeddings' shape do, and the embeddings (vocabulary x hidden: as large as the head) are not
    read again beside the head."""

    def __init__(self, embeddings):
        super().__init__()
        self.width, self.dtype = embeddings.embedding_dim, embeddings.weight.dtype
        self.num_embeddings = embeddings.num_embeddings  # the vocabulary the tasks' ids are checked against

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.width, dtype=self.dtype, device=ids.device)


def _outside_layers(model):
    """The modules outside the decoder layers that hold parameters or buffers (the layers being stand-ins now), none
    inside another: each is lent its weights and moved to the device once."""
    holders = [m for m in model.modules() if any(t is not None for t in (*m._parameters.values(),
                                                                         *m._buffers.values()))]
    inside = {id(s) for m in holders for s in m.modules() if s is not m}
    return [m for m in holders if id(m) not in inside]
