"""A packed mixture's experts in one launch per projection (sdsengine.nn.grouped): the routing it builds on the
device, the stacked form, the contract of the grouped kernel against its reference, and the kernel itself (GPU)."""
import copy
import pickle
import re
import weakref

import pytest
import torch

import sdsengine
from sdsengine import ops, transformers_compat
from sdsengine.bench import random_routing
from sdsengine.config import MagnitudeConfig
from sdsengine.kernels import compress_24, decompress_24
from sdsengine.nn import grouped
from sdsengine.nn.sparse_linear import use_backend
from sdsengine.pipeline import experts
from tiny_models import tiny_model, tiny_tokens

pytestmark = pytest.mark.skipif(transformers_compat.major() < 5, reason="fused experts came with transformers 5")


def _top_k(tokens, experts_, k, seed=0, sentinel=0):
    """Random routing: k distinct experts per token (as topk gives), the last `sentinel` tokens' last choice
    replaced by an index past the experts (expert parallelism's nobody)."""
    index = random_routing(tokens, experts_, k, "cpu", seed)
    if sentinel:
        index[-sentinel:, -1] = experts_
    return index


@pytest.mark.parametrize("tokens, experts_, k, sentinel", [(1, 8, 2, 0), (5, 4, 2, 0), (16, 128, 8, 0),
                                                         (7, 6, 3, 2), (3, 64, 8, 0)])
def test_device_routes_group_the_rows_as_the_host_routing_does(tokens, experts_, k, sentinel):
    index = _top_k(tokens, experts_, k, sentinel=sentinel)
    token, position, offsets, groups = grouped.device_routes(index, experts_)
    want_token, want_position, counts = experts._routed(index, experts_)
    routed = len(want_token)  # the host routing drops nobody's rows; the device one puts them last
    assert torch.equal(token[:routed], want_token) and torch.equal(position[:routed], want_position)
    assert len(token) == tokens * k and (index[token[routed:], position[routed:]] == experts_).all()
    assert offsets.dtype == groups.dtype == torch.int32
    assert offsets.tolist() == [sum(counts[:e]) for e in range(experts_ + 1)]
    used = [e for e in range(experts_) if counts[e]]
    assert groups.tolist() == used + [-1] * (min(experts_, tokens * k) - len(used))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("nobody", [-1, -4, 3, 9])
def test_device_routes_put_the_row_of_an_index_outside_the_experts_in_no_expert(dtype, nobody):
    index = torch.tensor([[1, nobody], [0, 1]], dtype=dtype)
    token, position, offsets, groups = grouped.device_routes(index, 3)
    assert offsets.tolist() == [0, 1, 3, 3] and groups.tolist() == [0, 1, -1]
    assert (token[-1], position[-1]) == (0, 1)


def _weights(experts_, rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(experts_, rows, cols, generator=g).to(dtype)
    return torch.stack([decompress_24(*compress_24(w)) for w in dense])  # 2:4, canonical


def _from_form(form, rows, cols):
    """The dense weights [E, rows, cols] a grouped form holds."""
    values_r, meta_r, _ = form
    return torch.stack([decompress_24(*ops.unreorder_24(v, m, rows, cols)) for v, m in zip(values_r, meta_r)])


def test_the_grouped_form_stacks_each_experts_kernel_form():
    w = _weights(3, 40, 96, torch.bfloat16)
    form = ops.grouped_form([compress_24(x) for x in w])
    assert form[0].shape[0] == form[1].shape[0] == 3 and form[1].dtype == torch.int32
    for e in range(3):
        v, m = ops.reorder_24(*compress_24(w[e]))
        assert torch.equal(form[0][e], v) and torch.equal(form[1][e], m)
    assert torch.equal(_from_form(form, 40, 96), w)


def test_the_grouped_form_refuses_damaged_metadata_naming_the_expert():
    values, meta = compress_24(_weights(1, 16, 64, torch.float16)[0])
    bad = meta.clone()
    bad[0, 0] = 0x0  # every group keeping column 0 twice: not an ordered pair
    with pytest.raises(ValueError, match="expert 1"):
        ops.grouped_form([(values, meta), (values, bad)])


def test_the_grouped_reference_fills_each_listed_experts_rows_and_zeros_elsewhere():
    w = _weights(4, 8, 32, torch.float32)
    bias = torch.randn(4, 8)
    x = torch.randn(7, 32)
    offsets = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)  # expert 1 has no rows; row 6 is nobody's
    y = ops.grouped_reference(x, w, offsets, torch.tensor([0, 2, -1, 3], dtype=torch.int32), 3, bias)
    for e, (start, stop) in {0: (0, 2), 2: (2, 5), 3: (5, 6)}.items():
        torch.testing.assert_close(y[start:stop], x[start:stop] @ w[e].T + bias[e])
    assert not y[6].any()


def _packed(family="mixtral", dtype=torch.bfloat16):
    model = tiny_model(family)
    sdsengine.prune(model, MagnitudeConfig(sparsity="2:4"), tiny_tokens(), progress=False)
    model = transformers_compat.cast(model, dtype)
    model.set_experts_implementation("eager")
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def fake_grouped_kernel(calls):
    """ops.run_grouped on the CPU (test_benchmarks uses it too): the grouped reference on the weights the stacked
    form holds."""
    def run(form, x, offsets, groups, max_rows, bias, out_features, typical_rows=None):
        calls.append((x.shape[0], max_rows))
        return ops.grouped_reference(x, _from_form(form, out_features, x.shape[1]), offsets, groups, max_rows, bias)
    return run


@pytest.mark.parametrize("family, dtype", [("mixtral", torch.bfloat16), ("gpt_oss", torch.bfloat16),
                                           ("qwen3_moe", torch.bfloat16), ("mixtral", torch.float16),
                                           ("gpt_oss", torch.float16)])
def test_a_packed_mixture_through_its_grouped_path_computes_what_the_per_expert_path_does(family, dtype, monkeypatch):
    """The routing, stacking and gate around the grouped kernel, on the CPU with the kernel's reference in its place
    (GPT-OSS: transposed banks with biases and a clamped gate): bit for bit, as each row's sums round once both ways."""
    model = _packed(family, dtype)
    ids = tiny_tokens(2, 8, seed=1)
    sdsengine.convert(model, pack_experts=True)
    per_expert = _logits(model, ids).float()
    packed = [m for m in model.modules() if isinstance(m, experts.UnfusedExperts)]
    assert packed and all(isinstance(m.grouped, grouped.GroupedBanks) for m in packed)
    calls = []
    monkeypatch.setattr(grouped.GroupedBanks, "applies", lambda self, unfused, x, top_k_index: True)
    monkeypatch.setattr(ops, "run_grouped", fake_grouped_kernel(calls))
    torch.testing.assert_close(_logits(model, ids).float(), per_expert, rtol=0, atol=0)  # each sum rounded once
    assert calls and all(call == (16 * model.config.num_experts_per_tok, 16) for call in calls)


def test_the_grouped_path_adds_both_choices_of_an_expert_a_token_chose_twice(monkeypatch):
    model = _packed()
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    x = torch.randn(3, model.config.hidden_size).to(torch.bfloat16)
    twice, weights = torch.tensor([[2, 2], [1, 3], [0, 0]]), torch.tensor([[0.25, 0.5], [0.5, 0.5], [0.75, 0.125]])
    with torch.no_grad():
        per_expert = unfused(x, twice, weights)
        monkeypatch.setattr(grouped.GroupedBanks, "applies", lambda self, unfused, x, top_k_index: True)
        monkeypatch.setattr(ops, "run_grouped", fake_grouped_kernel([]))
        torch.testing.assert_close(unfused(x, twice, weights), per_expert, rtol=0, atol=0)


def test_experts_kept_dense_have_no_grouped_path():
    model = _packed()
    sdsengine.convert(model, pack_experts=True, ignore=["*.experts.1.down_proj"])
    layers = [m for m in model.modules() if isinstance(m, experts.UnfusedExperts)]
    assert layers and all(m.grouped is None for m in layers)


def test_the_grouped_path_does_not_serve_the_cpu():
    model = _packed()
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    hidden = torch.zeros(4, model.config.hidden_size, dtype=torch.bfloat16)
    assert not unfused.grouped.applies(unfused, hidden, torch.zeros(4, 2, dtype=torch.long))


@pytest.mark.parametrize("tokens, top_k, experts, served", [
    (1, 8, 128, True), (512, 8, 128, True), (513, 8, 128, False),  # Qwen3-30B-A3B: 32 rows per expert at 512
    (64, 2, 8, True), (128, 2, 8, True), (129, 2, 8, False), (256, 2, 8, False),  # Mixtral: 0.66x at 256
    (0, 2, 8, False)])
def test_the_grouped_kernel_serves_up_to_its_measured_rows_per_expert(tokens, top_k, experts, served):
    assert grouped.in_regime(tokens, top_k, experts) is served


@pytest.mark.parametrize("expert", [0, 3])
def test_the_stacked_form_is_made_again_when_an_experts_weights_are_reloaded(expert):
    model = _packed()
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    first = unfused.grouped._form(unfused, "down_proj")
    assert unfused.grouped._form(unfused, "down_proj")[0] is first[0]  # kept between calls
    model.model.layers[1].self_attn.q_proj.load_state_dict(model.model.layers[1].self_attn.q_proj.state_dict())
    assert unfused.grouped._form(unfused, "down_proj")[0] is first[0]  # another layer reloaded: looked, kept
    linear = unfused._modules[str(expert)].down_proj
    state = {k: v.clone() for k, v in linear.state_dict().items()}
    state["values"].neg_()
    linear.load_state_dict(state)
    again = unfused.grouped._form(unfused, "down_proj")
    assert again[0] is not first[0] and torch.equal(again[0][0][expert], -first[0][0][expert])
    assert torch.equal(again[0][0][expert - 1], first[0][0][expert - 1])


def test_the_old_stack_is_freed_before_a_reloaded_mixtures_new_one_is_made(monkeypatch):
    """A whole model reloaded changes every expert: the old stack, as large as the experts' weights, must not
    live on beside the new one while it is made."""
    model = _packed()
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    old = weakref.ref(unfused.grouped._form(unfused, "down_proj")[0][0])
    model.load_state_dict(model.state_dict())
    alive, make = [], ops.grouped_form
    monkeypatch.setattr(ops, "grouped_form", lambda forms: alive.append(old() is not None) or make(forms))
    unfused.grouped._form(unfused, "down_proj")
    assert alive == [False]


def test_a_packed_mixture_pickles_and_copies_without_its_stacks(monkeypatch):
    model = _packed()
    ids = tiny_tokens(1, 4, seed=2)
    sdsengine.convert(model, pack_experts=True)
    monkeypatch.setattr(grouped.GroupedBanks, "applies", lambda self, unfused, x, top_k_index: True)
    monkeypatch.setattr(ops, "run_grouped", fake_grouped_kernel([]))
    expected = _logits(model, ids)  # stacks made
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        packed = [m for m in copied.modules() if isinstance(m, experts.UnfusedExperts)]
        assert packed and all(m.grouped._forms == {} for m in packed)
        assert torch.equal(_logits(copied, ids), expected)


@pytest.mark.parametrize("lean", [False, True])
def test_a_pickled_packed_mixture_holds_each_experts_weight_once(lean, monkeypatch):
    """Each expert's kernel form views the grouped stack: pickled as it is, every expert would carry the whole stack."""
    model = _packed()
    ids = tiny_tokens(1, 4, seed=2)
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    sdsengine.nn.set_lean(unfused, lean)
    expected = _logits(model, ids)
    size = len(pickle.dumps(unfused))
    monkeypatch.setattr(ops, "available", lambda device, dtype: ["sdsengine", "dense"])  # as on a GPU
    monkeypatch.setattr(grouped.GroupedBanks, "applies", lambda self, unfused, x, top_k_index: True)
    monkeypatch.setattr(ops, "run_grouped", fake_grouped_kernel([]))
    assert torch.equal(_logits(model, ids), expected)  # stacks made, shared by the experts
    assert len(pickle.dumps(unfused)) < 1.1 * size
    copied = pickle.loads(pickle.dumps(model))
    assert torch.equal(_logits(copied, ids), expected)
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), model.state_dict().values()))


def test_a_moved_mixture_drops_its_stacks():
    model = _packed()
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    unfused.grouped._form(unfused, "down_proj")
    model.to(torch.float16)
    assert unfused.grouped._forms == {}
    assert unfused.grouped._form(unfused, "down_proj")[0][0].dtype == torch.float16


# -- the kernel (GPU) ----------------------------------------------------------------------------------------------

def _grouped_call(tokens, experts_, k, rows, cols, dtype, bias, seed=0, sentinel=0):
    index = _top_k(tokens, experts_, k, seed=seed, sentinel=sentinel).cuda()
    token, _, offsets, groups = grouped.device_routes(index, experts_)
    w = _weights(experts_, rows, cols, dtype, seed=seed).cuda()
    x = torch.randn(tokens, cols, dtype=dtype, device="cuda")[token]
    b = torch.randn(experts_, rows, dtype=dtype, device="cuda") if bias else None
    form = ops.grouped_form([compress_24(m) for m in w])
    return (form, x, offsets, groups, tokens, b, rows), ops.grouped_reference(x, w, offsets, groups, tokens, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, experts_, k, rows, cols, bias, sentinel", [
    (1, 8, 2, 1536, 2048, False, 0),  # one decode token: a Qwen3-30B-A3B-like gate_up, shrunk
    (3, 6, 2, 200, 96, True, 1),  # odd rows and columns, biases, a row of nobody's
    (16, 128, 8, 64, 768, False, 0),  # 128 experts, most with one row or none
    (64, 4, 2, 48, 256, True, 0),  # every expert's rows past one token tile
    (100, 4, 2, 48, 256, False, 0),  # more rows per expert than one token block: a second block per group
])
@pytest.mark.parametrize("typical", [None, 1, "max"])  # tiles for even routing (the default), 8 rows, every row
def test_the_grouped_kernel_matches_its_reference(dtype, tokens, experts_, k, rows, cols, bias, sentinel, typical):
    args, want = _grouped_call(tokens, experts_, k, rows, cols, dtype, bias, sentinel=sentinel)
    got = ops.run_grouped(*args, typical_rows=tokens if typical == "max" else typical)
    assert ops.relative_error(got, want) < 1e-2
    assert not got[args[2][-1].item():].any()  # nobody's rows stay zero
    assert all(not locks.any() for locks in args[0][2].values())  # split-K tickets left zero, blocks that left too


@pytest.mark.gpu
@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "offsets": a["offsets"].long()}, "offsets must be a 1-D int32 tensor"),
    (lambda a: {**a, "offsets": a["offsets"][:-1]}, "offsets must have experts + 1 = 7 entries, got 6"),
    (lambda a: {**a, "groups": a["groups"][:0]}, "groups is empty"),
    (lambda a: {**a, "max_rows": 0}, "max_rows must be in [1, 6]"),
    (lambda a: {**a, "typical_rows": 4}, "typical_rows must be in [0, max_rows = 3]"),
    (lambda a: {**a, "bias": a["bias"][:5]}, "bias must have shape (6, 200), got [5, 200]"),
])
def test_the_grouped_binding_names_bad_inputs(change, message):
    (form, x, offsets, groups, tokens, bias, rows), _ = _grouped_call(3, 6, 2, 200, 96, torch.float16, True)
    args = change({"offsets": offsets, "groups": groups, "max_rows": tokens, "bias": bias, "typical_rows": 0})
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.load_extension().spmm24_grouped(x, form[0], form[1], args["offsets"], args["groups"], rows,
                                            args["max_rows"], args["bias"], typical_rows=args["typical_rows"])


@pytest.mark.gpu
def test_the_grouped_kernel_waits_for_nothing_and_replays_in_a_cuda_graph():
    args, want = _grouped_call(8, 16, 4, 256, 512, torch.bfloat16, True)
    ops.run_grouped(*args)  # split-K tickets made outside capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.run_grouped(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.run_grouped(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert ops.relative_error(out, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_packed_mixtures_decode_step_runs_grouped_and_matches_the_per_expert_path(family, fresh_choices):
    model = _packed(family).cuda()
    sdsengine.convert(model, pack_experts=True)
    ids = tiny_tokens(1, 4, seed=3).cuda()
    packed = [m for m in model.modules() if isinstance(m, experts.UnfusedExperts)]
    decode = torch.zeros(4, model.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    routes = torch.zeros(4, model.config.num_experts_per_tok, dtype=torch.long, device="cuda")
    assert all(m.grouped.applies(m, decode, routes) for m in packed)
    with use_backend("dense"):
        assert not any(m.grouped.applies(m, decode, routes) for m in packed)  # a forced backend: each expert on it
    grouped_logits = _logits(model, ids).float()
    paths = [m.grouped for m in packed]
    for m in packed:
        m.grouped = None  # the per-expert path
    torch.testing.assert_close(grouped_logits, _logits(model, ids).float(), rtol=2e-2, atol=2e-2)
    for m, path in zip(packed, paths):
        m.grouped = path


@pytest.mark.gpu
def test_a_packed_experts_module_at_decode_waits_for_nothing_and_replays_new_routing_in_a_cuda_graph(fresh_choices):
    model = _packed().cuda()
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    hidden = torch.randn(2, model.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    index = _top_k(2, unfused.num_experts, model.config.num_experts_per_tok, seed=4).cuda()
    weights = torch.rand(index.shape, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = unfused(hidden, index, weights)  # forms and tickets made here, outside capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            unfused(hidden, index, weights)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = unfused(hidden, index, weights)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        index.copy_(_top_k(2, unfused.num_experts, model.config.num_experts_per_tok, seed=5))  # another step's routing
        hidden.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, unfused(hidden, index, weights))


def test_lean_experts_give_their_buffers_up_to_the_grouped_stack_and_hold_their_weights_once(monkeypatch):
    model = _packed()
    ids = tiny_tokens(1, 4, seed=2)
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    canonical = {n: t.clone() for n, t in unfused.state_dict().items()}
    per_expert = _logits(model, ids)
    sdsengine.nn.set_lean(unfused)  # the experts alone: the attention's layers would try our kernel on the CPU
    before = sdsengine.nn.weight_bytes(unfused)["compressed"]
    monkeypatch.setattr(ops, "available", lambda device, dtype: ["sdsengine", "dense"])  # as on a GPU
    monkeypatch.setattr(grouped.GroupedBanks, "applies", lambda self, unfused, x, top_k_index: True)
    monkeypatch.setattr(ops, "run_grouped", fake_grouped_kernel([]))
    assert torch.equal(_logits(model, ids), per_expert)
    linears = [getattr(e, bank) for e in unfused.experts() for bank in ("gate_up_proj", "down_proj")]
    assert all(m._holds_released() for m in linears)
    stack = unfused.grouped._form(unfused, "down_proj")[0][0]
    assert all(m._forms["sdsengine"][0].data_ptr() == stack[e].data_ptr()
               for e, m in enumerate(linears[1::2]))  # views of the stack, not copies
    assert sdsengine.nn.weight_bytes(unfused)["compressed"] < 0.15 * before  # stand-ins; the stack is not a buffer
    assert torch.equal(_logits(model, ids), per_expert)
    assert unfused.grouped._form(unfused, "down_proj")[0][0] is stack  # not made again by the release
    assert all(torch.equal(t, canonical[n]) for n, t in unfused.state_dict().items())


def test_lean_experts_released_before_their_first_grouped_call_hold_their_weights_once(monkeypatch):
    """A prefill (past MAX_ROWS_PER_EXPERT: one expert at a time) releases each lean expert's buffers to a form of its own;
    the first decode call's stack must then take that form's place, not sit beside it."""
    model = _packed()
    ids = tiny_tokens(1, 4, seed=2)
    sdsengine.convert(model, pack_experts=True)
    unfused = next(m for m in model.modules() if isinstance(m, experts.UnfusedExperts))
    per_expert = _logits(model, ids)
    sdsengine.nn.set_lean(unfused)
    why_not = ops._why_not
    monkeypatch.setattr(ops, "available", lambda device, dtype: ["sdsengine", "dense"])  # as on a GPU
    monkeypatch.setattr(ops, "_why_not",
                        lambda b, device, dtype: None if b == "sdsengine" else why_not(b, device, dtype))
    decode = []
    monkeypatch.setattr(grouped.GroupedBanks, "applies", lambda self, unfused, x, top_k_index: bool(decode))
    monkeypatch.setattr(ops, "run_grouped", fake_grouped_kernel([]))
    with use_backend("dense"):  # the prefill: per expert, each lean expert released to its own form
        assert torch.equal(_logits(model, ids), per_expert)
    linears = {bank: [getattr(e, bank) for e in unfused.experts()] for bank in ("gate_up_proj", "down_proj")}
    assert all(m._holds_released() for ms in linears.values() for m in ms)
    decode.append(True)
    assert torch.equal(_logits(model, ids), per_expert)
    for bank, ms in linears.items():
        stack = unfused.grouped._form(unfused, bank)[0][0].untyped_storage()
        assert all(m._released[2][0].untyped_storage().data_ptr() == stack.data_ptr() for m in ms)
    stacks = sum(unfused.grouped._form(unfused, b)[0][i].untyped_storage().nbytes() for b in linears for i in (0, 1))
    assert sdsengine.nn.weight_bytes(unfused)["forms"] == stacks  # the experts' own forms freed
    assert torch.equal(_logits(model, ids), per_expert)
