"""Mixture-of-experts layers: their experts as linears the methods can prune, for the length of a prune.

transformers 5 keeps a layer's experts in one module as fused 3-D parameters: gate_up_proj (experts, 2·ffn,
hidden) and down_proj (experts, hidden, ffn), or each transposed (GPT-OSS), with biases or not; its
`use_experts_implementation` decorator records which on the module (has_gate, is_transposed, has_bias). No
nn.Linear holds them, so no method would see them. While a model is pruned, `unfused(model)` puts in each such
module's place an UnfusedExperts: one nn.Linear per expert and projection, holding that expert's slice, routing
tokens as the fused module does. Each expert's linears then see only the tokens routed to it, so every method's
statistics are that expert's own, and its 2:4 groups lie along the input dimension as in any linear. Where the banks
sit on the device the prune runs on, the linears are views of them, pruned in place: no expert is copied, and nothing is
stacked back. Otherwise (each layer visits the device: a view moved there and back would be a copy beside its bank) they
are copies, and on leaving the pruned slices are stacked back into the 3-D parameters. Either way the model saves and
loads as it came.

A converted model keeps its UnfusedExperts for good (`for_inference`, `settle`): its 2:4 experts' linears become
SparseLinears like any other, so the experts, most of a mixture's weights, run compressed too (at decode on a GPU
all in one launch per projection: `grouped`, sdsengine/nn/grouped.py).

Routers (the experts' siblings named in ROUTERS) stay dense: they are tiny, and a pruned router sends tokens to
other experts than the ones the calibration statistics were taken for.
"""
import contextlib
import functools
import itertools
import re

import torch
from torch import nn

ROUTERS = ("gate", "router", "shared_expert_gate")


def is_fused_experts(module) -> bool:
    """A transformers-5 experts module: the decorator's flags and a 3-D bank per projection."""
    if not all(hasattr(module, flag) for flag in ("is_transposed", "has_bias")):
        return False
    banks = [getattr(module, name, None) for name in bank_names(module)]
    return all(isinstance(b, nn.Parameter) and b.dim() == 3 for b in banks)


def has_gate(module) -> bool:
    """Whether the experts gate (gate and up fused in gate_up_proj) or not (up_proj alone). The decorator of
    transformers 5.0 to 5.2 sets no has_gate flag (5.3 added it): every experts module it knew was gated."""
    return getattr(module, "has_gate", True)


def bank_names(module) -> tuple[str, str]:
    """A fused experts module's two banks, in the order tokens meet them."""
    return _first(module), "down_proj"


def _first(module) -> str:
    """The bank the tokens meet first: gate and up fused, or up alone (experts without a gate)."""
    return "gate_up_proj" if has_gate(module) else "up_proj"


def router_names(layer) -> set[str]:
    """Names (relative to the layer) of the modules that route tokens to the layer's experts."""
    found = set()
    for name, module in layer.named_modules():
        if is_fused_experts(module) or isinstance(module, UnfusedExperts):
            parent = name.rpartition(".")[0]
            owner = layer.get_submodule(parent) if parent else layer
            found |= {f"{parent}.{r}" if parent else r for r in ROUTERS if hasattr(owner, r)}
    return found


def role(name) -> str:
    """A linear's name with its expert's index starred: 'mlp.experts.7.down_proj' -> 'mlp.experts.*.down_proj'."""
    return re.sub(r"(^|\.)experts\.\d+\.", r"\1experts.*.", name)


def is_router(name, routers) -> bool:
    return any(name == r or name.startswith(r + ".") for r in routers)


class Expert(nn.Module):
    """One expert's two projections as linears: `gate_up_proj` (or `up_proj`) and `down_proj`."""

    def __init__(self, fused, index, copy=True):
        super().__init__()
        for bank in bank_names(fused):
            setattr(self, bank, _linear(fused, bank, index, copy))


def _linear(fused, bank, index, copy) -> nn.Linear:
    """The expert's slice of a bank as an nn.Linear: its own copy, or (copy False) a view of the bank."""
    weight = _expert_slice(getattr(fused, bank), index, fused.is_transposed)
    bias = getattr(fused, f"{bank}_bias")[index] if fused.has_bias else None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(_own(weight) if copy else weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(_own(bias) if copy else bias.detach(), requires_grad=bias.requires_grad)
    return linear


def _expert_slice(bank, index, transposed=False):
    """Expert `index`'s slice of a bank (a weight (out, in) as nn.Linear holds it, or a bias)."""
    return bank[index].T if transposed else bank[index]


def _viewed_slice(bank, index, transposed=False):
    """_expert_slice as a view where it is contiguous (a copy where transposed): the bank lives while a slice does."""
    return _expert_slice(bank, index, transposed).contiguous()


def _stacked(weights, transposed):
    """A bank from its experts' weights ((out, in) each): _expert_slice's inverse."""
    return torch.stack(_as_in_bank(weights, transposed))


def _as_in_bank(weights, transposed):
    """Each expert's weight ((out, in)) as its slice of the bank lies (views)."""
    return [w.T if transposed else w for w in weights]


def _own(tensor):
    # contiguous: a transposed bank's slice (GPT-OSS) would clone with the bank's strides
    return tensor.detach().clone(memory_format=torch.contiguous_format)


class UnfusedExperts(nn.Module):
    """A fused experts module's weights as per-expert linears, with its forward: each routed token through its
    experts' projections, the gate (the fused module's own, which knows its layout: concatenated or interleaved,
    clamped or not), the optional post-expert norm, then weighted by its routing weight and summed."""

    records_routes = False  # set while a model is pruned: the dense stream's pairing reads the routes
    grouped = None  # a packed model's sdsengine.nn.grouped.GroupedBanks: all experts in one launch, at decode

    def __init__(self, fused, copy=True):
        super().__init__()
        if getattr(fused, "_is_expert_parallel", False):
            raise ValueError("experts split across devices (expert parallelism) cannot be pruned or converted: load "
                             "the model on one device")
        self.num_experts = getattr(fused, _first(fused)).shape[0]
        for e in range(self.num_experts):  # named as the index, as transformers 4 named its experts' modules
            self.add_module(str(e), Expert(fused, e, copy))
        if getattr(fused, "has_post_expert_norm", False):
            self.post_expert_norm = fused.post_expert_norm
        self.__dict__["fused"] = fused  # not a submodule: its banks are emptied while the linears hold them

    def experts(self):
        return [getattr(self, str(e)) for e in range(self.num_experts)]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Each token through its experts, batched where the experts need not be told apart: one gather of the
        routed rows (grouped by expert), the gate once, the weighting and sum once; only the linears run per expert,
        on their slices (or, packed for decode, each projection of all experts in one launch: `grouped`). Each row's
        arithmetic, and each sum's order, are the eager loop's (one expert at a time): _summed adds each token's
        outputs in expert order, on every device."""
        _check_weights(top_k_index, top_k_weights)
        fused = self.fused
        if self.grouped is not None and self.grouped.applies(self, hidden_states, top_k_index):
            token, position, offsets, groups = self.grouped.routes(top_k_index, self.num_experts)
            tokens = hidden_states.shape[0]  # each token picks an expert once: no expert has more rows
            linear = lambda bank, x: self.grouped.run(self, bank, x, offsets, groups, tokens)  # noqa: E731
        else:
            token, position, counts = _routed(top_k_index, self.num_experts)
            spans = _spans(counts)
            linear = lambda bank, x: self._per_expert(bank, x, token, spans)  # noqa: E731
        first, down = bank_names(fused)
        h = linear(first, hidden_states[token])
        h = fused._apply_gate(h) if has_gate(fused) else fused.act_fn(h)
        h = linear(down, h)
        if hasattr(self, "post_expert_norm"):
            h = self.post_expert_norm(h)
        return _summed((h * top_k_weights[token, position, None]).to(hidden_states.dtype), token, position,
                       top_k_index, hidden_states)

    def _per_expert(self, bank, x, token, spans):
        """Each expert's linear `bank` on its rows of x (grouped by expert: spans holds (expert, start, stop) of
        those with rows). Modules are looked up in _modules: nn.Module's attribute lookup of every expert's linears,
        twice per call, took a quarter of a decode step's time (128 experts, 8 per token; CPU, cProfile)."""
        parts = []
        for e, start, stop in spans:
            linear = self._modules[str(e)]._modules[bank]
            if self.records_routes:  # which tokens these are, for the dense stream's pairing
                linear.routed_tokens = token[start:stop]
            parts.append(linear(x[start:stop]))
        if not parts:  # no token at all
            return x.new_empty((0, getattr(self.experts()[0], bank).out_features))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _apply(self, fn, recurse=True):
        if self.grouped is not None:  # moved: the stacks made on the old device go, as the linears' forms do
            self.grouped.drop()
        return super()._apply(fn, recurse)

    # banks built under a caller's torch.inference_mode() would be inference tensors, which no training step can
    # use afterwards; a dense model's weights, pruned in place, stay ordinary tensors
    @torch.inference_mode(False)
    def fuse_back(self):
        """The linears' weights (and biases) back into the fused module's 3-D parameters, where the linears are: each
        bank stacked from them, unless they are still views of it (pruned in place, nothing to do)."""
        fused = self.fused
        for bank in bank_names(fused):
            linears = [getattr(expert, bank) for expert in self.experts()]
            weights = [m.weight.detach() for m in linears]
            if not _views_of(getattr(fused, bank), weights, fused.is_transposed):
                _put(fused, bank, _stacked(weights, fused.is_transposed))
            biases = [m.bias.detach() for m in linears] if fused.has_bias else None
            if biases and not _views_of(getattr(fused, f"{bank}_bias"), biases):
                _put(fused, f"{bank}_bias", torch.stack(biases))


def _views_of(bank, tensors, transposed=False) -> bool:
    """Whether tensors[e] is still expert e's slice of bank, in its memory, for every e: linears made as views of it
    (copy False) and never moved off (a move makes copies)."""
    if bank.is_meta or len(tensors) != bank.shape[0]:  # an emptied bank (the linears hold copies), or a skeleton's
        return False
    for e, tensor in enumerate(tensors):
        view = _expert_slice(bank, e, transposed)
        if (tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride()) != (
                view.device, view.data_ptr(), view.shape, view.stride()):
            return False
    return True


def slices(module, prefix) -> dict:
    """Where the parameters of the UnfusedExperts within `module` (named `prefix`) come from: {a parameter's name: (the
    name of the fused module's tensor it is a slice of, take: that tensor -> the parameter's values, a view of it where
    the layout allows)}. A skeleton's experts are lent theirs so (pipeline/streaming.py): the checkpoint holds banks,
    or what transformers fuses into them, and a bank read for its slices is held once."""
    found = {}
    for name, unfused in module.named_modules(prefix=prefix):
        if isinstance(unfused, UnfusedExperts):
            fused, at = unfused.fused, _under(name)
            for bank, e in itertools.product(bank_names(fused), range(unfused.num_experts)):
                found[f"{at}{e}.{bank}.weight"] = (
                    f"{at}{bank}", functools.partial(_viewed_slice, index=e, transposed=fused.is_transposed))
                if fused.has_bias:
                    found[f"{at}{e}.{bank}.bias"] = (f"{at}{bank}_bias", functools.partial(_viewed_slice, index=e))
    return found


def fused_banks(layer, state) -> tuple[dict, dict]:
    """(the rest, banks) of the state dict `state` of `layer` (its experts unfused, while a prune runs): banks maps the
    name of each fused module's bank to its experts' slices, bank[e] for expert e (its linear's tensor in state, a view
    of it where transposed), which torch.stack makes the bank of (fuse_back's stacking) when it is needed: a layer's
    banks need not all be held at once beside its linears, nor at all where their slices are written apart."""
    rest, banks = dict(state), {}
    for name, unfused in layer.named_modules():
        if isinstance(unfused, UnfusedExperts):
            fused, at = unfused.fused, _under(name)
            for bank in bank_names(fused):
                weights = [rest.pop(f"{at}{e}.{bank}.weight") for e in range(unfused.num_experts)]
                banks[f"{at}{bank}"] = _as_in_bank(weights, fused.is_transposed)
                if fused.has_bias:
                    banks[f"{at}{bank}_bias"] = [rest.pop(f"{at}{e}.{bank}.bias") for e in range(unfused.num_experts)]
    return rest, banks


def _under(name):
    """The prefix of names under module `name` ('' for the module a state dict is of)."""
    return f"{name}." if name else ""


def _put(fused, name, tensor):
    """tensor as the data of the fused module's parameter `name`. The Parameter itself stays, as a dense model's
    weights, pruned in place, do: an optimizer, a hook or a caller that held it holds the pruned bank."""
    getattr(fused, name).data = tensor


def _check_weights(top_k_index, top_k_weights):
    """Refuses routing weights that are not one per chosen expert. Some transformers releases (5.0 for PhiMoE and
    HunYuan-MoE; 5.1 no longer) hand the experts every expert's weight, zeros where not chosen, while the experts
    read them by position in the top k: transformers' own eager and grouped_mm experts then disagree (0.6 apart in
    the tiny models' logits), and neither computes the mixture the model was trained as. Pruning calibrated on
    that would fit the wrong function."""
    if top_k_weights.shape[-1] != top_k_index.shape[-1]:
        raise ValueError(f"this model's router hands its experts {top_k_weights.shape[-1]} routing weights per token "
                         f"for {top_k_index.shape[-1]} chosen experts: transformers of this release computes this "
                         "mixture wrongly itself (PhiMoE and HunYuan-MoE under transformers 5.0); use a newer "
                         "transformers (5.1 or later) to prune or convert it")


def _routed(top_k_index, num_experts):
    """(token, position, counts): every routed (token, place in its top k) grouped by expert, in token order within
    each, and how many each expert got (a list: the host reads the counts once, where asking each expert would stop
    a GPU once per expert, 128 in Qwen3-30B-A3B). An index past the experts (expert parallelism's sentinel) is
    nobody's."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: each expert's tokens in order, as torch.where gives them
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
    pick = order[:sum(counts)]
    return pick // k, pick % k, counts


def _summed(rows, token, position, top_k_index, like):
    """Each token's weighted expert outputs (rows, one per routed (token, position)) summed in the order of its
    experts' indices, into a tensor like `like`: what the eager loop's index_add_ per expert adds, in its order. Not
    one index_add_ over all rows: a token repeats there (once per expert), and CUDA adds repeated rows atomically,
    in no fixed order, so the sums' last bits changed from run to run (transformers' own experts avoid it too).
    An expert a token chose twice (no topk router does) fills two slots, in top-k order, rather than one twice."""
    k = top_k_index.shape[-1]
    key = torch.add(torch.arange(k, device=top_k_index.device), top_k_index, alpha=k)  # by expert, then position
    rank = (key[:, None, :] < key[:, :, None]).sum(-1)  # each choice's place in its token's expert order
    slots = like.new_zeros((like.shape[0] * k, like.shape[-1]))
    slots.index_copy_(0, token * k + rank[token, position], rows)  # each slot once: no repeated index
    slots = slots.view(like.shape[0], k, like.shape[-1])
    out = torch.zeros_like(like)
    for j in range(k):  # a slot no expert filled (expert parallelism's sentinel) adds zero
        out += slots[:, j]
    return out


def _spans(counts):
    """(expert, start, stop) of each expert with rows, where rows are grouped by expert, counts[e] for expert e."""
    spans, start = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, start, start + n))
        start += n
    return spans


def paired(x, tokens, dense_x, dense_tokens):
    """The dense stream's inputs to an expert's linear row for row with x, its inputs in the pruned stream (rows for
    `tokens`): where the dense model's router did not send a token to this expert (or sent it none: dense_x None),
    a zero row. The statistics' teacher term, sum_t ||W d_t - V x_t||^2, then asks V for the dense model's
    contribution of this expert to each token: W·0 = 0 where the dense model had none."""
    out = x.new_zeros(x.shape).reshape(-1, x.shape[-1])
    if dense_x is None:
        return out
    # an expert's linear runs only for tokens routed to it: neither token list is empty here
    row = torch.full((int(max(tokens.max(), dense_tokens.max())) + 1,), -1, dtype=torch.long, device=tokens.device)
    row[dense_tokens] = torch.arange(len(dense_tokens), device=tokens.device)
    mine = row[tokens]
    hit = mine >= 0
    out[hit] = dense_x.reshape(-1, dense_x.shape[-1])[mine[hit]].to(out.dtype)
    return out


def _empty_banks(fused):
    """Free the fused module's copies once the linears hold theirs (a model's experts are most of its weights)."""
    for bank in bank_names(fused):
        for name in (bank, f"{bank}_bias") if fused.has_bias else (bank,):
            old = getattr(fused, name)
            _put(fused, name, old.new_empty((0,) * old.dim()))


@contextlib.contextmanager
def unfused(layers, device=None):
    """Inside the block, every fused experts module of `layers` is an UnfusedExperts; on leaving, whatever
    happened inside, each fused module is back in its place holding the linears' (pruned) weights. `device`: where
    the prune runs (None: nothing runs, nothing moves). A module whose banks are there gets linears that view them
    (no copy); one elsewhere, or transposed (GPT-OSS: its slices are not contiguous, which some kernels need), gets
    copies, and its banks are freed while they are held."""
    swapped = []
    try:
        for layer in layers:
            for name, module in list(layer.named_modules()):
                if is_fused_experts(module):
                    parent_name, _, child = name.rpartition(".")
                    parent = layer.get_submodule(parent_name) if parent_name else layer
                    copy = module.is_transposed or not _resident(module, device)
                    replacement = UnfusedExperts(module, copy)
                    replacement.records_routes = True
                    swapped.append((parent, child, replacement))  # from here on, put back whatever happens
                    if copy:
                        _empty_banks(module)
                    setattr(parent, child, replacement)
        yield len(swapped)
    finally:
        _put_back(swapped)


def _resident(fused, device) -> bool:
    """Whether the fused module's banks are on `device` (None: wherever they are; a skeleton's, on the meta device, are
    lent elsewhere)."""
    bank = getattr(fused, _first(fused))
    if bank.is_meta:
        return False
    if device is None:
        return True
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return bank.device == device


def _put_back(swapped):
    """Each fused module back in its place with its linears' weights. One that fails (out of memory while stacking)
    stays unfused, and the rest still go back before its error is raised: stopping at the first left every later
    layer unfused too. Each module's linears let go once its banks are rebuilt: held to the end, every layer's
    experts were in memory twice over (linears and rebuilt banks) when the last one was fused back."""
    failed = None
    while swapped:
        parent, child, replacement = swapped.pop(0)
        try:
            replacement.fuse_back()
            setattr(parent, child, replacement.fused)
        except BaseException as exc:  # Ctrl-C too: the next layers are still put back
            failed = failed or exc
        del replacement
    if failed is not None:
        raise failed


def for_inference(fused) -> UnfusedExperts:
    """An UnfusedExperts whose linears are views of the fused module's banks: nothing is copied, so a model's
    experts can be built, converted and put in place (with settle) one after another without a second copy."""
    return UnfusedExperts(fused, copy=False)


@torch.no_grad()
def settle(unfused):
    """After an UnfusedExperts from for_inference is in the model for good: its linears still viewing the banks (an
    expert kept dense) get their own copies, and the fused module's banks are freed."""
    for expert in unfused.experts():
        for linear in (getattr(expert, bank) for bank in bank_names(unfused.fused)):
            if isinstance(linear, nn.Linear):
                linear.weight = nn.Parameter(_own(linear.weight), requires_grad=linear.weight.requires_grad)
                if linear.bias is not None:
                    linear.bias = nn.Parameter(_own(linear.bias), requires_grad=linear.bias.requires_grad)
    _empty_banks(unfused.fused)
