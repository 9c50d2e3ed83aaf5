"""SparseLinear: a drop-in nn.Linear that holds its weight 2:4-compressed and runs the fastest backend.

The weight lives as the canonical compress_24 pair (values, meta) plus the bias, all persistent buffers,
so a state dict is the compressed checkpoint. Each backend's own form of the weight (sdsengine.ops.prepare)
is derived on first use and dropped whenever the buffers move or are reloaded.

On CUDA, forward picks per (weight shape, token-count bucket, dtype, device, bias) the backend measured
fastest: every available backend, dense included, is timed once on a random input of the bucket's size and
checked against dense (one that disagrees is dropped with a warning). A sparse backend wins only if it
beats dense by more than the noise margin, so the layer is never slower than dense beyond noise. Timed as
called by default, host work included, as eager code runs it; a layer set for CUDA graphs (set_graphs) is timed
by the GPU's own time, as a graph replays it: there cuSPARSELt's host cost is gone, and a kernel chosen for its
light call can be the slower one. On the CPU
the only backend is dense (decompressed once and cached, unless lean), reached by the same path, so
everything is testable without a GPU. A lean layer (set_lean) holds one copy of its weight, trading time for
memory: no decompressed copy (its dense backend decompresses on every call, and that is the dense time its
tuning compares against), and where our kernel runs, not the canonical pair either: from the first call, our
kernel's form holds the weight, the buffers become one-element stand-ins, and the pair is rebuilt from the
form wherever it is needed (state_dict, .weight, another backend's form, the dense call, a move or a
reload). Code that reads the buffers themselves (named_buffers) sees the stand-ins. Limits: the first call
of a lean layer inside CUDA-graph capture keeps its buffers for good (the graph reads them), and a first
call through torch.func.functional_call releases the tensors swapped in, so the layer keeps its own buffers
and that form beside them (correct, not lean).

Each layer remembers, per (token count, dtype), the backend and form it settled on, so a repeated call
costs one dict lookup more than nn.Linear: the decision keys (str(device), buckets) are computed only on a
miss. Those routes are dropped whenever they could be stale: the autotune cache cleared, a backend forced
or released; and with the derived forms, whenever values or meta are not the tensors, at the versions,
they were derived from (moved, reloaded, changed in place, swapped by torch.func.functional_call).
"""
import contextlib
import functools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from sdsengine import ops
from sdsengine.kernels import check_meta, compress_24, decompress_24
from sdsengine.masks import nm_violations
from sdsengine.pipeline import experts

NOISE_MARGIN = 0.02  # a sparse backend must beat dense by this fraction to be chosen
MAX_BUCKET = 8192
MAX_ROUTES = 64  # routes a layer remembers (by exact token count) before it starts over: a few decode and prefill sizes

_choices = {}  # (out, in, bucket, dtype, device, has_bias, lean, graphs) -> backend name, shared by layers of one shape
_forced = None
# Whether any autocast is on, one C call: forward asks before the per-device check, whose torch.device and string
# parsing cost more than the rest of a call's checks (an eager prefill is host-bound: every microsecond of a
# linear's call shows). Private in torch, so taken where it exists.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_epoch = 0  # bumped whenever a layer's remembered routes may be stale
_weights_epoch = 0  # bumped whenever a layer is made or its buffers may change (moved, reloaded, lean changed)


@contextlib.contextmanager
def use_backend(name):
    """Run every SparseLinear on one backend inside a with-block (tests, benchmarks); None: autotune."""
    global _forced
    if name is not None and name not in ops.BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {ops.BACKENDS}")
    previous, _forced = _forced, name
    _expire_routes()
    try:
        yield
    finally:
        _forced = previous
        _expire_routes()


def _weights_changed():
    global _weights_epoch
    _weights_epoch += 1


def weights_epoch():
    """A number that changes whenever some SparseLinear is made, or its weight buffers may have been replaced or
    changed (a move, a reload, a change of lean): forms made from many layers (a mixture's grouped stack) look at
    their layers again only then, not on every call."""
    return _weights_epoch


def clear_autotune_cache():
    _choices.clear()
    ops.clear_split_choices()
    _expire_routes()


def _expire_routes():
    global _epoch
    _epoch += 1


def autotune_choices():
    """A copy of the decisions so far: {(out, in, bucket, dtype, device, has_bias, lean, graphs): backend}."""
    return dict(_choices)


def weight_bytes(model):
    """What the linear weights of `model` hold, in bytes, as it stands (forms are derived on first use):
    {"dense": nn.Linear weights and a mixture's fused expert banks, "compressed": SparseLinear values and meta,
    "forms": the backends' forms derived from those (the dense decompression on the CPU and wherever dense is
    chosen, cuSPARSELt's packed weight, our kernel's fragment order, which a lean layer keeps in place of its
    values and meta)}. Biases are left out; a storage shared by two modules counts once."""
    seen, held = set(), {"dense": 0, "compressed": 0, "forms": 0}
    for module in model.modules():
        if isinstance(module, SparseLinear):
            held["compressed"] += _storage_bytes((module.values, module.meta), seen)
            held["forms"] += _storage_bytes((module._forms, module._released), seen)
        elif isinstance(module, nn.Linear):
            held["dense"] += _storage_bytes(module.weight, seen)
        elif experts.is_fused_experts(module):
            held["dense"] += _storage_bytes([p for p in module.parameters(recurse=False) if p.dim() == 3], seen)
    return held


def _storage_bytes(obj, seen):
    """Bytes of the storages of the tensors in obj (nested tuples, lists, dicts; a tensor subclass such as
    PyTorch's semi-structured one by its inner tensors) not yet in `seen`."""
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_storage_bytes(o, seen) for o in obj)
    if not isinstance(obj, torch.Tensor):
        return 0
    if is_traceable_wrapper_subclass(obj):
        return sum(_storage_bytes(getattr(obj, name), seen) for name in obj.__tensor_flatten__()[0])
    storage = obj.untyped_storage()
    key = (obj.device, storage.data_ptr())
    if key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def _decompress_reordered(values_r, meta_r, rows, cols):
    """The dense weight from our kernel's form (a released lean layer's dense call)."""
    return decompress_24(*ops.unreorder_24(values_r, meta_r, rows, cols), trusted=True)


def _warn_frozen():
    warnings.warn("SparseLinear runs in training mode on an input that requires grad, but its weights are frozen "
                  "buffers that no optimizer updates (converted layers are for inference; train the dense model "
                  "before converting)", stacklevel=2)


def set_lean(model, lean=True):
    """Set `lean` on every SparseLinear of `model` (see SparseLinear.lean); returns how many there are."""
    return _set_on_every_layer(model, "lean", lean)


def set_graphs(model, graphs=True):
    """Set `graphs` on every SparseLinear of `model` (see SparseLinear.graphs); returns how many there are."""
    return _set_on_every_layer(model, "graphs", graphs)


def _set_on_every_layer(model, setting, value):
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for layer in layers:
        setattr(layer, setting, value)
    return len(layers)


def token_bucket(n):
    """Token counts share a decision by power-of-two bucket: 3 -> 4, 100 -> 128."""
    return min(1 << max(0, (n - 1).bit_length()), MAX_BUCKET)


# torch.compile. A layer's call is host code Dynamo cannot trace (our kernels' launches, the split-K and cuSPARSELt
# searches, the per-stream tickets), and its route depends on the token count, on which traced code would
# specialize (a compile per count). Compiled, each call is instead one custom op, opaque to the compiler, whose
# output shape it knows: its body is the layer's eager call, which chooses the route for the actual count (tuning
# it on first meeting it) on any backend. So a compiled model is one graph whatever its token counts, and inductor
# fuses what lies between the linears. The op finds its layer by id in _layers, which holds every layer weakly.
# Registered through torch.library.Library, not custom_op: a call costs ~3 us of dispatch on the host instead of
# ~10 (CPU, torch 2.13), which compiled code without CUDA graphs pays on every linear.
_layers = weakref.WeakValueDictionary()
_library = torch.library.Library("sdsengine", "FRAGMENT")
_library.define("sparse_linear(Tensor x, int layer, int out_features) -> Tensor")


def _compiled_call(x, layer, out_features):
    module = _layers.get(layer)
    if module is None:
        raise RuntimeError("sdsengine::sparse_linear: the SparseLinear this code was compiled for is gone")
    return module._forward(x)


_library.impl("sparse_linear", _compiled_call, "CompositeExplicitAutograd")


@torch.library.register_fake("sdsengine::sparse_linear", lib=_library)
def _(x, layer, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W stored 2:4-compressed; same constructor arguments and forward as nn.Linear.

    For inference: W (and b) are buffers, not parameters, so an optimizer never sees them (a forward in
    training mode on an input that requires grad warns). `.weight` is a decompressed copy: editing it changes
    nothing, and assigning it is refused. Change a layer through load_state_dict or from_dense (an in-place edit
    of its buffers is seen too, compiled or not: the next call derives its forms again). Not an nn.Linear
    subclass, so code that looks for nn.Linear (PEFT's LoRA) passes it by.
    """

    _lean = False
    _graphs = False
    _released = None  # lean, the buffers given up: (values stand-in, meta stand-in, our kernel's form)
    _pinned = False  # a CUDA graph may read the buffers (captured before their release): never release them

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        if in_features % 32 or in_features <= 0 or out_features <= 0:
            raise ValueError(f"SparseLinear needs positive features, in_features divisible by 32, got in_features="
                             f"{in_features}, out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
        self.register_buffer("meta", torch.full((out_features, in_features // 32), ops.PAD_META, device=device,
                                                dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)
        self._forms, self._source = {}, None  # the forms' source: (values, its version, meta, its version)
        _weights_changed()  # it may take another layer's place (forms made of many layers look again)
        self._routes, self._routes_epoch = {}, _epoch  # (tokens, dtype) -> (backend, form)
        _layers[id(self)] = self  # for sdsengine::sparse_linear

    @property
    def lean(self):
        """False (the default): wherever dense is the backend, hold the decompressed weight beside the compressed
        one (the dense weight's bytes again, the fastest dense). True: hold no dense copy and decompress on
        every dense call, which tuning then times as dense's cost; and where our kernel runs, its form alone
        holds the weight (the module docstring says how). See set_lean."""
        return self._lean

    @lean.setter
    def lean(self, lean):
        if bool(lean) == self._lean:
            return
        self._derive_again()  # the dense form as asked
        self._lean = bool(lean)  # a pin stays: a graph captured before may still read the buffers

    @property
    def graphs(self):
        """False (the default): backends are compared by their time as called, host work included, as eager code
        runs them. True: by the GPU's time alone, as a CUDA graph (or torch.compile's reduce-overhead mode)
        replays them; set it before the warm-up that precedes capture, where tuning happens. On the H200
        (2026-12-04, spmm.json) at 16 tokens our kernel's light call won eagerly on 1024x4096 where dense took
        0.87x its GPU time, and cuSPARSELt, 0.9 ms a call eagerly, took 0.82-0.86x dense's GPU time on the four
        large Llama shapes. The two are decided and remembered apart. Such a layer takes only backends whose calls
        capture and replay correctly (ops.capture_error: cuSPARSELt's is checked once, in a child process). See
        set_graphs."""
        return self._graphs

    @graphs.setter
    def graphs(self, graphs):
        self._graphs, self._routes = bool(graphs), {}  # the routes were decided the other way

    @classmethod
    def from_dense(cls, weight, bias=None):
        """From a (out, in) weight that already holds exact 2:4 zeros; refuses anything else."""
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear takes a 2-D (out_features, in_features) weight, got shape "
                             f"{tuple(weight.shape)}")
        out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if in_features % 32:
            raise ValueError(f"cannot compress a ({out_features}, {in_features}) weight: 2:4 kernels need "
                             f"in_features divisible by 32, got {in_features}")
        violations = nm_violations(weight, 2, 4)
        if violations:
            raise ValueError(f"weight ({out_features}, {in_features}) is not 2:4 sparse: {violations} groups of 4 "
                             "hold more than 2 nonzeros (prune it to 2:4 first)")
        # built empty on the meta device and handed the compressed tensors: buffers of its own, filled by a copy, held
        # the compressed weight twice for a while (convert's peak on the CPU)
        layer = cls(in_features, out_features, bias is not None, device="meta", dtype=weight.dtype)
        layer.values, layer.meta = compress_24(weight.detach())
        if bias is not None:
            layer.bias = bias.detach().to(weight.device, weight.dtype, copy=True)
        return layer

    @classmethod
    def from_linear(cls, linear):
        """SparseLinear with the same weight and bias as a 2:4-pruned nn.Linear."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight, linear.bias)

    @property
    def weight(self):
        """The dense weight, decompressed on every access: for code that inspects .weight, not for compute."""
        return decompress_24(*self._canonical())

    def __setattr__(self, name, value):
        if name == "weight":  # nn.Module would raise a KeyError, or a plain setter keep the compressed one
            raise TypeError("SparseLinear holds its weight compressed: make a new layer with SparseLinear.from_dense "
                            "(weight, bias) or load one with load_state_dict")
        super().__setattr__(name, value)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"

    def forward(self, x):
        if torch.compiler.is_compiling():  # one op (_compiled_call), which has no backward: an input that requires
            if x.requires_grad and torch.is_grad_enabled():  # grad runs eagerly (a break in the graph there)
                return torch.compiler.disable(self._forward)(x)
            return torch.ops.sdsengine.sparse_linear(x, id(self), self.out_features)
        return self._forward(x)

    def _forward(self, x):
        buffers = self._buffers  # read directly: nn.Module's lookup of a buffer costs ~0.5 us, per call
        values = buffers["values"]
        if x.shape[-1] != self.in_features:  # reshape alone would accept any multiple of in_features
            raise ValueError(f"SparseLinear({self.in_features} -> {self.out_features}): input's last dimension must "
                             f"be {self.in_features}, got shape {tuple(x.shape)}")
        if self.training and x.requires_grad and not torch.compiler.is_compiling():  # fine-tuning it?
            _warn_frozen()
        if _any_autocast() and torch.is_autocast_enabled(x.device.type):
            if torch.get_autocast_dtype(x.device.type) != values.dtype:  # as nn.Linear: in autocast's dtype
                return F.linear(x, self._dense_weight(), buffers["bias"])
            x = x.to(values.dtype)  # autocast casts nn.Linear's operands; ours is compressed in its dtype
        if not torch.compiler.is_compiling():  # compiled code guards on the buffers itself; moves and reloads
            self._check_source(values, buffers["meta"])  # drop the forms either way (below)
        tokens = x.numel() // self.in_features  # x's rows as (tokens, in_features), without reshaping it
        route = self._routes.get((tokens, x.dtype)) if self._routes_epoch == _epoch else None
        if route is None:
            if tokens == 0:  # as nn.Linear: its dtype check, and an output autograd can go through
                return F.linear(x, self._dense_weight(), buffers["bias"])
            route = self._route(tokens, x.dtype)
        backend, form = route
        if backend != "dense" and x.requires_grad and torch.is_grad_enabled():  # our kernels and cuSPARSELt have
            # no backward: an input that needs its gradient (attribution, a prompt or an adapter trained through
            # the frozen layer) takes the dense weight, as nn.Linear would, instead of an output autograd cannot see
            return F.linear(x, self._dense_weight(), buffers["bias"])
        return ops.run(backend, form, x, buffers["bias"], self.out_features)

    def _route(self, tokens, dtype):
        """(backend, form) for this call, remembered for the next call of its size unless the decision was
        provisional (during CUDA-graph capture before tuning)."""
        if dtype != self.values.dtype:
            raise RuntimeError(f"SparseLinear: input dtype {dtype} differs from weight dtype {self.values.dtype}")
        if self._routes_epoch != _epoch:
            self._routes, self._routes_epoch = {}, _epoch
        if self._lean and self._released is None:
            self._release_buffers()
        backend = self._backend_for(tokens)
        route = (backend, self._form(backend))
        if _forced is not None or self._key(tokens) in _choices:
            if len(self._routes) >= MAX_ROUTES:  # kept per exact token count: a server sees every length
                self._routes.clear()
            self._routes[tokens, dtype] = route
        return route

    # -- derived forms ------------------------------------------------------------------------------

    def _form(self, backend):
        key = ops.form_key(backend)
        if key not in self._forms:
            if ops.capturing():  # correct, but made inside the graph: every replay makes it again
                warnings.warn(f"SparseLinear ({self.out_features}, {self.in_features}): the {backend} form of the "
                              "weight is prepared inside CUDA-graph capture, so every replay prepares it again; run "
                              "each token count once before capturing")
            if not torch.compiler.is_compiling():
                self._check_source(self.values, self.meta)
            with torch.inference_mode(False):  # a form made under inference_mode could not serve autograd later
                if key == "dense" and self._lean:  # no copy held: ops.run decompresses on every call
                    self._forms[key] = self._decompressing()
                elif key == "sdsengine" and self._holds_released():  # dropped by a later tuning: the same one
                    self._forms[key] = self._released[2]
                else:
                    self._forms[key] = ops.prepare(backend, *self._canonical())
        return self._forms[key]

    def share_form(self, values_r, meta_r):
        """Take our kernel's form of this very weight, made elsewhere (a packed mixture's experts: views of their
        grouped stack, sdsengine.nn.grouped), as its own, so the weight is not held twice; a lean layer then
        releases its buffers to it, as at its first call."""
        self._check_source(self.values, self.meta)  # forms of other buffers go first
        form = (values_r, meta_r, {}, {})
        self._forms["sdsengine"], self._routes = form, {}
        if self._holds_released():  # released to a form of its own before (a prefill): the shared one replaces it
            self._released = (*self._released[:2], form)
        elif self._lean and self._released is None:
            self._release_buffers()

    def _check_source(self, v, m):
        """Drop every derived form and route unless values v and meta m are the very tensors, unchanged,
        that they were derived from (a lean layer's released form is kept apart: see _canonical)."""
        s = self._source
        if s is None or s[0] is not v or s[2] is not m or s[1] != v._version or s[3] != m._version:
            self._forms, self._routes, self._source = {}, {}, (v, v._version, m, m._version)

    # -- lean: the canonical pair given up for our kernel's form -------------------------------------

    def _holds_released(self):
        r = self._released
        return r is not None and self._buffers["values"] is r[0] and self._buffers["meta"] is r[1]

    def _released_weight(self):
        """(values_r, meta_r, rows, cols): the form the buffers were released to, as ops.unreorder_24 takes it."""
        values_r, meta_r = self._released[2][:2]
        return values_r, meta_r, self.out_features, self.in_features

    def _canonical(self):
        """(values, meta) in compress_24's layout: the buffers, or rebuilt from the form they were released to."""
        if self._holds_released():
            return ops.unreorder_24(*self._released_weight())
        return self.values, self.meta

    def _dense_weight(self):
        """The dense weight for one call, its metadata trusted (checked when made or loaded; the check would
        synchronize with a GPU on every call)."""
        return decompress_24(*self._canonical(), trusted=True)

    def _decompressing(self):
        """A lean layer's dense form: a function that decompresses the weight for one call, from the tensors
        that hold it now (not from the module: a form referring to it would keep it alive in a cycle)."""
        if self._holds_released():
            return functools.partial(_decompress_reordered, *self._released_weight())
        check_meta(self.meta, "SparseLinear")  # once here, not per call (and a stand-in's copy fails here)
        return functools.partial(decompress_24, self.values, self.meta, trusted=True)

    def _release_buffers(self):
        """Lean, where our kernel runs: its form holds the whole weight, so the buffers give their memory back
        to one-element stand-ins of the same shape, dtype and device. Done at the first eager call, before
        tuning, so the dense backend is timed as it will run. A first call inside CUDA-graph capture pins the
        buffers instead (the graph reads them); under torch.compile nothing happens until an eager call, so
        make a lean layer's first call eager where the compiled code is replayed as a CUDA graph."""
        if self._pinned or torch.compiler.is_compiling():
            return
        if ops.capturing():
            self._pinned = True
            return
        if "sdsengine" not in ops.available(self.values.device, self.values.dtype):
            return
        with torch.inference_mode(False):  # stand-ins made under inference_mode could not track versions
            form = self._form("sdsengine")
            v, m = self.values, self.meta
            if v.is_cuda:  # freed below while this stream may still read them (reorder_24): not reused until done
                v.record_stream(torch.cuda.current_stream(v.device))
                m.record_stream(torch.cuda.current_stream(m.device))
            stand_v, stand_m = v.new_zeros(1).expand(v.shape), m.new_zeros(1).expand(m.shape)
        self._buffers["values"], self._buffers["meta"] = stand_v, stand_m
        self._released = (stand_v, stand_m, form)
        self._forms, self._routes = {"sdsengine": form}, {}  # anything else made from the buffers: again
        self._source = (stand_v, stand_v._version, stand_m, stand_m._version)

    def _derive_again(self):
        """Before a move, a reload or a change of lean: the canonical pair back in the buffers (a layer whose
        buffers were swapped by hand since its release keeps those), every form and route dropped."""
        _weights_changed()
        if self._holds_released():
            with torch.inference_mode(False):
                self._buffers["values"], self._buffers["meta"] = self._canonical()
        self._released = None
        self._forms, self._routes, self._source = {}, {}, None

    def __setstate__(self, state):  # unpickled or deep-copied: a layer of its own for sdsengine::sparse_linear
        super().__setstate__(state)
        _layers[id(self)] = self

    def __getstate__(self):
        """Pickled (or deep-copied) without its derived forms and routes, made again on first use: a form may view a
        larger tensor (a packed mixture's grouped stack), which pickle would store whole for every layer. A released
        lean layer goes with its canonical pair in its buffers."""
        state = dict(self.__dict__)
        if self._holds_released():
            values, meta = self._canonical()
            state["_buffers"] = {**self._buffers, "values": values, "meta": meta}
        state.update(_forms={}, _routes={}, _source=None, _released=None)
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._holds_released():  # the weight, not its stand-ins
            destination[prefix + "values"], destination[prefix + "meta"] = self._canonical()

    def _apply(self, fn, recurse=True):
        self._derive_again()  # moved
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._derive_again()  # reloaded in place (into real buffers)
        return super()._load_from_state_dict(*args, **kwargs)

    # -- backend choice -----------------------------------------------------------------------------

    def _key(self, tokens):
        return (self.out_features, self.in_features, token_bucket(tokens), self.values.dtype,
                str(self.values.device), self.bias is not None, self._lean,  # lean: dense costs more
                self._graphs)  # graphs: timed by the GPU's time alone

    def _backend_for(self, tokens):
        if _forced is not None:
            return _forced
        key = self._key(tokens)
        if key not in _choices:
            if ops.capturing():
                return "dense"  # timing is impossible while capturing; warm up before capture to tune
            _choices[key] = self._tune(key[2])
            self._keep_chosen_forms()
        return _choices[key]

    def _tune(self, tokens):
        """The fastest correct backend for `tokens` rows; dense unless a sparse one beats it beyond noise (or
        dense cannot run here: then the fastest correct sparse one, with a warning)."""
        candidates = ops.available(self.values.device, self.values.dtype)
        if self._graphs:  # only what captures and replays correctly
            candidates = [b for b in candidates if ops.capture_error(b) is None]
        if candidates == ["dense"]:
            return "dense"
        g = torch.Generator(device=self.values.device).manual_seed(0)
        x = torch.randn(tokens, self.in_features, device=self.values.device, dtype=self.values.dtype, generator=g)
        ref = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        times = {b: t for b in candidates if (t := self._time_checked(b, x, ref)) is not None}
        if not times:
            raise RuntimeError(f"SparseLinear ({self.out_features}, {self.in_features}) x {tokens} tokens: no backend "
                               f"ran correctly (tried {', '.join(candidates)})")
        best = min(times, key=times.get)
        dense = times.get("dense")
        if dense is None:  # a correct sparse backend beats a forward that cannot run at all
            warnings.warn(f"SparseLinear: dense could not run on ({self.out_features}, {self.in_features}) x {tokens} "
                          f"tokens, so {best!r} is used unmeasured against it")
            return best
        return best if times[best] < dense * (1 - NOISE_MARGIN) else "dense"

    def _time_checked(self, backend, x, ref):
        """Milliseconds of `backend` on x, or None if it cannot run or gets a wrong answer."""
        try:
            form = self._form(backend)
            fn = lambda: ops.run(backend, form, x, self.bias, self.out_features)  # noqa: E731
            err = ops.relative_error(fn(), ref)
        except ops.BackendUnavailable:
            return None
        except RuntimeError as exc:  # a library refusing this token count: not a reason to fail the forward
            warnings.warn(f"SparseLinear: backend {backend!r} failed on ({self.out_features}, {self.in_features}) x "
                          f"{x.shape[0]} tokens: {exc}; not using it")
            self._forms.pop(ops.form_key(backend), None)
            return None
        if err > 2e-2:
            warnings.warn(f"SparseLinear: backend {backend!r} disagrees with dense (relative error {err:.3g}) on "
                          f"shape ({self.out_features}, {self.in_features}) x {x.shape[0]} tokens; not using it")
            self._forms.pop(ops.form_key(backend), None)
            return None
        return ops.time_ms(fn, device=x.device, hide_host=self._graphs)

    def _keep_chosen_forms(self):
        """Tuning prepared every backend's form; keep only those some bucket of this shape chose, eagerly or for
        graphs (a model can run both ways: an eager prefill, decode steps as graphs)."""
        mine = self._key(1)
        chosen = {ops.form_key(b) for k, b in _choices.items() if k[:2] == mine[:2] and k[3:7] == mine[3:7]}
        self._forms = {key: f for key, f in self._forms.items() if key in chosen}
