"""A packed mixture's experts in one launch per projection: the routing stays on the GPU.

A converted mixture whose experts are packed (`convert(model, pack_experts=True)`) holds them as an UnfusedExperts
of SparseLinears. Its eager forward runs them one expert at a time, and to cut the routed rows into experts it
reads the experts' token counts on the host: a synchronization per layer, and nothing CUDA graphs can capture.
At decode that host work likely costs more than the halved weight bytes save (not measured on a GPU).

GroupedBanks runs each projection of all experts as one launch of the mma.sp kernel's grouped form
(ops.run_grouped): the experts' compressed weights stacked, the routed rows grouped by expert, and where each
expert's rows start (offsets) and which experts have rows (groups) computed and read on the device. Nothing
waits for the GPU, and a decode step can be captured whole.

It runs where the kernel can and the regime is the kernel's: CUDA, float16/bfloat16, at most MAX_ROWS_PER_EXPERT
routed rows per expert on average (decode, and a many-expert mixture's prefill; the per-expert path's SparseLinears
pick their fastest backend, dense included, for longer inputs), no autocast or autograd, and no backend forced
other than ours (`use_backend`). A fixed rule, not timed per shape as a SparseLinear's backends are: timing a block
needs real routing. The stack holds the experts' weights in the kernel's layout (9/16 of their dense bytes); it is
made on the first grouped call on a device, and again when the buffers move or are reloaded. Each expert's
SparseLinear shares its slice as its own kernel form, so a lean expert (set_lean) gives its buffers up to it and the
experts hold their weights once; not lean, they hold the compressed buffers beside it (9/8 of the dense bytes in
all).
"""
import weakref

import torch

from sdsengine import ops
from sdsengine.nn import sparse_linear
from sdsengine.nn.sparse_linear import SparseLinear
from sdsengine.pipeline import experts as experts_mod

# Routed rows per expert, on average, up to which the grouped kernel serves a call. On the H200 (bench_grouped, 12-04)
# it ran 1.07-2.8x torch._grouped_mm up to 32 (Qwen3-30B-A3B's experts at 512 tokens, Mixtral-8x7B's at 64) and
# 0.51-0.66x from 64 (Mixtral's at 256 and 512 tokens); past it the per-expert path runs, each expert's SparseLinear
# on its fastest backend. By rows, not tokens: a 128-expert mixture's 512-token prefill routes 32 rows to an expert.
MAX_ROWS_PER_EXPERT = 32


def in_regime(tokens, top_k, num_experts):
    """Whether the grouped kernel serves `tokens` tokens routed to `top_k` of `num_experts` experts each."""
    return 0 < tokens and tokens * top_k <= MAX_ROWS_PER_EXPERT * num_experts


def device_routes(top_k_index, num_experts):
    """(token, position, offsets, groups), all on top_k_index's device, without reading anything back: every
    routed (token, place in its top k) grouped by expert (stable: in token order within each; an index past the
    experts, or negative, last, in no expert), offsets (int32, E + 1) where each expert's rows start, and groups
    (int32, min(E, rows)): the experts with rows, in index order, then -1s."""
    k = top_k_index.shape[-1]
    # Nobody's index (negative, or past the experts) becomes num_experts: after every expert. Few launches, since a
    # decode step of a mixture makes this routing once per layer: clamp, then remainder maps -1 to num_experts.
    key = top_k_index.reshape(-1).clamp(-1, num_experts).remainder(num_experts + 1)
    key, order = torch.sort(key, stable=True)
    experts = torch.arange(num_experts + 1, dtype=key.dtype, device=key.device)
    offsets = torch.searchsorted(key, experts, out_int32=True)  # rows with a smaller key: where each expert starts
    has_rows = offsets[1:] > offsets[:-1]
    groups = torch.where(has_rows, experts[:-1], num_experts).sort().values[:min(num_experts, key.numel())]
    groups = torch.where(groups < num_experts, groups, -1).to(torch.int32)
    return order // k, order % k, offsets, groups


class GroupedBanks:
    """The grouped path of one UnfusedExperts whose every expert linear is a SparseLinear (of() builds one)."""

    def __init__(self, unfused):
        self.banks = experts_mod.bank_names(unfused.fused)
        self._forms = {}  # bank -> (weights epoch, snapshot, (values_r, meta_r, locks), stacked bias, out_features)
        self._runs = {}  # (device, dtype) -> whether our kernel runs there

    @classmethod
    def of(cls, unfused):
        """A GroupedBanks for `unfused`, or None where some expert linear is not a SparseLinear (kept dense) or the
        experts' shapes differ."""
        for bank in experts_mod.bank_names(unfused.fused):
            linears = [getattr(e, bank) for e in unfused.experts()]
            if not all(isinstance(m, SparseLinear) for m in linears):
                return None
            if len({(m.in_features, m.out_features, m.bias is not None, m.values.dtype, m.values.device)
                    for m in linears}) != 1:
                return None
        return cls(unfused)

    routes = staticmethod(device_routes)

    def applies(self, unfused, x, top_k_index):
        """Whether the grouped path serves this call (x: the layer's hidden states, tokens first; top_k_index: each
        token's experts)."""
        if not x.is_cuda or sparse_linear._forced not in (None, "sdsengine"):
            return False
        if not in_regime(x.shape[0], top_k_index.shape[-1], unfused.num_experts):
            return False
        if torch.is_autocast_enabled("cuda") or (x.requires_grad and torch.is_grad_enabled()):
            return False
        if x.dtype != _first_linear(unfused, self.banks[0]).values.dtype:
            return False  # as a SparseLinear, the per-expert path names the mismatch
        key = (x.device, x.dtype)
        if key not in self._runs:  # asked once: the answer needs the device's capability and the extension
            self._runs[key] = "sdsengine" in ops.available(x.device, x.dtype)
        return self._runs[key]

    def run(self, unfused, bank, x, offsets, groups, max_rows):
        """The experts' `bank` projection on their rows of x (grouped by expert as offsets says)."""
        form, bias, out_features = self._form(unfused, bank)
        return ops.run_grouped(form, x, offsets, groups, max_rows, bias, out_features)

    def drop(self):
        """Forget the stacks (the module is moving: SparseLinears drop their forms then too)."""
        self._forms = {}

    def __getstate__(self):
        """Pickled or deep-copied without its stacks: derived from the experts' weights, made again on first use
        (and their weak references cannot be pickled)."""
        return {**self.__dict__, "_forms": {}, "_runs": {}}

    def _form(self, unfused, bank):
        """The stacked form of the experts' weights. Kept while no SparseLinear anywhere was made, moved, reloaded or
        changed lean (sparse_linear.weights_epoch, one comparison per call); after that, while every expert's
        buffers are still the tensors, at the versions and lean setting, they were after it was made. Each expert
        then shares its slice of the stack as its own kernel form (SparseLinear.share_form): a lean expert gives
        its buffers up to it, so the experts' weights are held once. In-place edits of the buffers are not seen
        (change a layer through load_state_dict, as under torch.compile)."""
        kept = self._forms.get(bank)
        epoch = sparse_linear.weights_epoch()
        if kept is not None and kept[0] == epoch:
            return kept[2:]
        linears = [getattr(e, bank) for e in unfused.experts()]
        if kept is not None and kept[1] == _snapshot(linears):
            self._forms[bank] = (epoch, *kept[1:])
            return kept[2:]
        del kept  # no reference from here to the old stack while the new one is made
        return self._stack(bank, linears)[2:]

    def _stack(self, bank, linears):
        """A new stack of the linears' weights, shared with each of them. The old one is dropped first: freed
        before the new one is made unless an expert's form still views it (a lean expert's weight lives only
        there until it shares the new stack)."""
        if ops.capturing():
            raise RuntimeError("the grouped experts' weights are prepared inside CUDA-graph capture: run the model "
                               "once before capturing, and again after moving or reloading it")
        self._forms.pop(bank, None)
        with torch.inference_mode(False):
            form = ops.grouped_form([m._canonical() for m in linears])
            bias = torch.stack([m.bias for m in linears]) if linears[0].bias is not None else None
        for linear, values_r, meta_r in zip(linears, form[0], form[1]):
            linear.share_form(values_r, meta_r)
        kept = self._forms[bank] = (sparse_linear.weights_epoch(), _snapshot(linears), form, bias,
                                    linears[0].out_features)
        return kept


def _first_linear(unfused, bank):
    return unfused._modules["0"]._modules[bank]  # not attribute lookups: this runs on every decode call


class _Same:
    """A tensor as a key part: equal only to the very same tensor at the same version (a weak reference: a key
    must not keep a replaced buffer alive)."""

    def __init__(self, tensor):
        self.ref = None if tensor is None else weakref.ref(tensor)
        self.version = None if tensor is None else tensor._version

    def __eq__(self, other):
        mine, theirs = (None if s.ref is None else s.ref() for s in (self, other))
        return mine is theirs and (mine is None or self.version == other.version)


def _snapshot(linears):
    """What each expert's buffers are now, to tell later whether the stack still holds them."""
    return [(m, _Same(m.values), _Same(m.meta), _Same(m.bias), m.lean) for m in linears]
