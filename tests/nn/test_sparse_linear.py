"""SparseLinear, convert and compressed checkpoints: CPU first (the dense path must equal the pruned layer),
then every backend through SparseLinear on a GPU."""
import importlib
import json

import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import sdsengine.nn.sparse_linear as sl
from sdsengine import ops
from sdsengine.kernels import compress_24, decompress_24
from sdsengine.masks import nm_mask, nm_violations
from sdsengine.nn import SparseLinear, convert, load_compressed, save_compressed, use_backend


def prune_24_(module):
    """Magnitude 2:4 on |W| along the input dimension, in place."""
    w = module.weight.data
    module.weight.data = w * nm_mask(w.abs(), 2, 4)
    return module


def pruned_linear(in_features, out_features, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return prune_24_(nn.Linear(in_features, out_features, bias=bias)).to(dtype)


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(config).eval()
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                prune_24_(module)
    return model


def tokens(batch=2, seqlen=12, vocab=128):
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------------
# Compressed format and the CPU path
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_roundtrip_is_exact(dtype):
    w = pruned_linear(96, 40).weight.data.to(dtype)
    w[0, :4] = torch.tensor([-0.0, 0.0, 1.0, 0.0])  # fewer than 2 nonzeros, and a -0.0
    values, meta = compress_24(w)
    assert values.shape == (40, 48) and meta.shape == (40, 3) and meta.dtype == torch.int32
    assert torch.equal(decompress_24(values, meta), w)
    assert not torch.signbit(values[values == 0]).any()  # -0.0 stored as 0


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_forward_equals_dense_fp32(bias):
    linear = pruned_linear(128, 48, bias)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), linear(x), rtol=0, atol=1e-6)
    assert sparse(x).shape == (3, 5, 48)


def test_cpu_forward_bf16_within_tolerance():
    linear = pruned_linear(256, 64, dtype=torch.bfloat16)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(7, 256, dtype=torch.bfloat16)
    ref = x.float() @ linear.weight.float().T + linear.bias.float()
    torch.testing.assert_close(sparse(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_weight_property_and_repr():
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    assert torch.equal(sparse.weight, linear.weight.data)
    assert "2:4" in repr(sparse)
    assert set(sparse.state_dict()) == {"values", "meta", "bias"}


def test_moving_dtype_drops_cached_forms():
    sparse = SparseLinear.from_linear(pruned_linear(64, 32))
    x = torch.randn(2, 64)
    sparse(x)
    assert "dense" in sparse._forms
    sparse.to(torch.bfloat16)
    assert sparse(x.bfloat16()).dtype == torch.bfloat16
    assert [f.dtype for f in sparse._forms.values()] == [torch.bfloat16]


def test_load_state_dict_drops_cached_forms():
    a = SparseLinear.from_linear(pruned_linear(64, 32, seed=0))
    b = SparseLinear.from_linear(pruned_linear(64, 32, seed=1))
    x = torch.randn(2, 64)
    a(x)
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_forms_follow_the_buffers_they_came_from():
    """Weights changed in place, or swapped in by functional_call, are the ones that run: a cached form
    once kept the old weight while the new bias was used."""
    a, b = pruned_linear(64, 32, seed=0), pruned_linear(64, 32, seed=1)
    sa, sb = SparseLinear.from_linear(a), SparseLinear.from_linear(b)
    x = torch.randn(3, 64)
    with torch.no_grad():
        sa(x)
        torch.testing.assert_close(torch.func.functional_call(sa, dict(sb.state_dict()), (x,)), b(x))
        torch.testing.assert_close(sa(x), a(x))  # its own buffers again
        sa.values.mul_(2)
        torch.testing.assert_close(sa(x), x @ (2 * a.weight).T + a.bias)


@pytest.mark.parametrize("shape", [(64,), (3, 64), (2, 5, 64), (2, 1, 3, 64), (0, 4, 64)])
def test_any_leading_dimensions_give_nn_linears_output(shape):
    """Dense takes x as it is (no reshapes: an eager prefill is host-bound), as nn.Linear does: bit for bit."""
    linear = pruned_linear(64, 32)
    x = torch.randn(shape)
    torch.testing.assert_close(SparseLinear.from_linear(linear)(x), linear(x), rtol=0, atol=0)


def test_a_kernel_backend_sees_rows_and_returns_the_inputs_leading_dimensions(fake_backends, fresh_choices):
    layer, linear = SparseLinear.from_linear(pruned_linear(64, 32)), pruned_linear(64, 32)
    fake_backends.update(wrong=5.0, broken=5.0)  # ours (fake: its reordered form decompressed) is fastest
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(layer(x), linear(x))
    assert layer._routes[6, torch.float32][0] == "sdsengine"


def test_autocast_runs_in_the_weights_dtype():
    linear = pruned_linear(64, 32).to(torch.bfloat16)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(sparse(x), linear(x))
    with pytest.raises(RuntimeError, match="input dtype torch.float32 differs"):  # outside autocast: named
        sparse(x)


@pytest.mark.parametrize("lean", [False, True])
def test_torch_compile_traces_a_fresh_layer_in_one_graph(lean):
    """Host-side checks (buffer versions, metadata) stay out of compiled code: no graph breaks."""
    import torch._dynamo as dynamo
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    sparse.lean = lean
    x = torch.randn(3, 64)
    with torch.no_grad():
        explained = dynamo.explain(sparse)(x)
        dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


class StandInExtension:
    """sdsengine._C's spmm24 on a CPU: the reference product of the reordered form it is given, calls counted."""
    def __init__(self):
        self.calls = 0

    def spmm24(self, x, values_r, meta_r, out_features, bias, split_k, locks):
        self.calls += 1
        values, meta = ops.unreorder_24(values_r, meta_r, out_features, x.shape[1])
        return torch.nn.functional.linear(x, decompress_24(values, meta), bias).detach()  # as the kernel: no history


def route_to_stand_in(monkeypatch, sparse, x):
    """Route sparse's calls of x's size to our kernel (its form made and filed as on a GPU), run by a stand-in."""
    extension = StandInExtension()
    monkeypatch.setattr(ops, "load_extension", lambda: extension)
    monkeypatch.setenv("SDSENGINE_SPLIT_K", "0")
    with torch.no_grad():
        sparse(x)  # eager: the layer notes its buffers (_check_source) and routes this count to dense
    form = (*ops.reorder_24(sparse.values, sparse.meta), {}, {})
    sparse._routes[x.numel() // sparse.in_features, x.dtype] = ("sdsengine", form)
    return extension


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)])
def test_torch_compile_runs_our_kernel_through_one_opaque_op(monkeypatch, shape):
    """Compiled, a layer's call is the custom op sdsengine::sparse_linear: one graph, no break (the launch, the
    split-K choice and the tickets are host code Dynamo cannot trace); the op's eager body takes the layer's route
    and gives the eager result. On a CPU: the route set by hand, the kernel a stand-in (the reference product of
    the same reordered form)."""
    import torch._dynamo as dynamo
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(*shape)
    extension = route_to_stand_in(monkeypatch, sparse, x)
    with torch.no_grad():
        eager = sparse(x)
        assert extension.calls == 1
        explained = dynamo.explain(sparse)(x)
        dynamo.reset()
        compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)(x)
        dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert extension.calls >= 3  # explain's run and the compiled one called the kernel too
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager, linear(x))


def test_an_input_that_needs_its_gradient_takes_the_dense_weight(monkeypatch):
    """Our kernel has no backward (its output carries no autograd history): where the input requires grad, the
    layer computes through the dense weight, so the gradient reaches the input; without grad, the kernel runs."""
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(3, 64)
    extension = route_to_stand_in(monkeypatch, sparse, x)
    sparse(x.clone().requires_grad_()).sum().backward()  # no error: the output has a history
    leaf = x.clone().requires_grad_()
    sparse(leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, linear.weight.detach().sum(0).expand(3, -1))
    assert extension.calls == 0
    with torch.no_grad():
        sparse(x.clone().requires_grad_())
    assert extension.calls == 1


def test_the_op_finds_its_layer_after_a_copy_and_names_one_gone():
    """sdsengine::sparse_linear runs the layer whose id it was compiled with: a deep copy (as bench_e2e makes) is a
    layer of its own; an id no layer has any more is named."""
    import copy
    linear = pruned_linear(64, 32)
    twin = copy.deepcopy(SparseLinear.from_linear(linear))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.ops.sdsengine.sparse_linear(x, id(twin), 32), linear(x))
        gone = SparseLinear.from_linear(linear)
        key = id(gone)
        del gone
        with pytest.raises(RuntimeError, match="the SparseLinear this code was compiled for is gone"):
            torch.ops.sdsengine.sparse_linear(x, key, 32)


def test_a_compiled_layer_passes_the_gradient_to_its_input(monkeypatch):
    """The op has no backward: compiled, an input that requires grad runs the layer eagerly, through the dense weight
    where its route is our kernel (a stand-in here, whose output has no history)."""
    import torch._dynamo as dynamo
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(3, 64)
    route_to_stand_in(monkeypatch, sparse, x)
    leaf = x.clone().requires_grad_()
    torch.compile(sparse, backend="aot_eager")(leaf).sum().backward()
    dynamo.reset()
    torch.testing.assert_close(leaf.grad, linear.weight.detach().sum(0).expand(3, -1))


def test_compiled_code_serves_every_token_count():
    """The route is chosen inside the op, per actual count: after the first two counts (static, then dynamic
    shapes) no count compiles again, and each gives nn.Linear's result."""
    import torch._dynamo as dynamo
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(sparse, backend=counting)
    with torch.no_grad():
        for tokens in (3, 5, 7, 9, 11, 13, 17, 19, 23, 29, 64):
            x = torch.randn(tokens, 64)
            torch.testing.assert_close(compiled(x), linear(x))
    dynamo.reset()
    assert len(graphs) <= 2, len(graphs)


def test_compiled_code_sees_an_in_place_edit_of_the_buffers():
    import torch._dynamo as dynamo
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    compiled = torch.compile(sparse, backend="aot_eager")
    x = torch.randn(3, 64)
    with torch.no_grad():
        compiled(x)
        sparse.values.mul_(2)
        sparse.bias.zero_()
        torch.testing.assert_close(compiled(x), x @ (2 * linear.weight).t())
    dynamo.reset()


def test_a_first_call_under_inference_mode_does_not_block_autograd():
    linear = pruned_linear(64, 32)
    sparse = SparseLinear.from_linear(linear)
    with torch.inference_mode():
        sparse(torch.randn(2, 64))
    x = torch.randn(2, 64, requires_grad=True)
    sparse(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(2, -1))


def test_from_linear_refuses_dense_weights():
    with pytest.raises(ValueError, match=r"\(16, 64\) is not 2:4 sparse: \d+ groups"):
        SparseLinear.from_linear(nn.Linear(64, 16))


def test_from_linear_refuses_in_features_not_divisible_by_32():
    with pytest.raises(ValueError, match="in_features divisible by 32, got 48"):
        SparseLinear.from_linear(pruned_linear(48, 16))


def test_token_buckets():
    assert [sl.token_bucket(n) for n in (1, 2, 3, 7, 13, 17, 100, 4096, 10 ** 6)] == \
        [1, 2, 4, 8, 16, 32, 128, 4096, sl.MAX_BUCKET]


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with use_backend("fast"):
            pass
    values, meta = compress_24(pruned_linear(64, 32).weight.detach())
    with pytest.raises(ValueError, match="unknown backend 'fast'"):  # before "needs a CUDA device" here
        ops.spmm24(torch.randn(2, 64), values, meta, backend="fast")


def dense_of(form, out_features, in_features):
    """The weight a fake backend's form stands for: a tensor, a lean layer's decompressing function, or our
    kernel's reordered pair."""
    if callable(form):
        return form()
    if isinstance(form, tuple):
        return decompress_24(*ops.unreorder_24(form[0], form[1], out_features, in_features))
    return form


@pytest.fixture
def fake_backends(monkeypatch):
    """The tuning policy on the CPU: backends with made-up timings (ms, or a pair: as called and the GPU's time
    alone); 'wrong' returns a wrong answer and 'broken' raises. Returns the dict of timings to edit."""
    timings = {"sdsengine": 1.0, "wrong": 0.5, "broken": 0.1, "dense": 2.0}
    last = []

    def run(backend, form, x, bias, out_features):
        last.append(backend)
        if backend == "broken":
            raise RuntimeError("unsupported token count")
        y = torch.nn.functional.linear(x, dense_of(form, out_features, x.shape[-1]), bias)  # x (..., K)
        return 3 * y if backend == "wrong" else y

    def time_ms(fn, device, hide_host):
        assert device == torch.device("cpu")  # timed on the weight's device, whatever the current one
        fn()
        timed = timings[last[-1]]  # a number, or (as called, the GPU's time alone)
        return timed[hide_host] if isinstance(timed, tuple) else timed
    monkeypatch.setattr(ops, "available", lambda device, dtype: list(timings))
    monkeypatch.setattr(ops, "prepare", lambda backend, values, meta: (*ops.reorder_24(values, meta), {}, {})
                        if backend == "sdsengine" else decompress_24(values, meta))  # ours: its real form
    monkeypatch.setattr(ops, "run", run)
    monkeypatch.setattr(ops, "time_ms", time_ms)
    return timings


def test_autotune_takes_the_fastest_correct_backend(fake_backends, fresh_choices):
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    with pytest.warns(UserWarning) as caught:
        assert layer._backend_for(3) == "sdsengine"
    messages = " ".join(str(w.message) for w in caught)
    assert "'wrong' disagrees with dense" in messages and "'broken' failed" in messages
    assert sl.autotune_choices() == {(32, 64, 4, torch.float32, "cpu", True, False, False): "sdsengine"}
    assert set(layer._forms) == {"sdsengine"}  # forms prepared for tuning and not chosen are released
    assert layer._backend_for(4) == "sdsengine"  # same bucket: no new measurement


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_layer_set_for_cuda_graphs_is_tuned_by_the_gpus_time_and_decided_apart(fake_backends, fresh_choices):
    """Ours has the lighter call but the longer GPU time (as 1024x4096 at 16 tokens on the H200): eagerly it
    wins, under graphs dense does; each decision is kept under its own key and a layer's routes follow its mode."""
    fake_backends.update(sdsengine=(1.0, 2.5), wrong=5.0, broken=5.0)
    eager, graphs = (SparseLinear.from_linear(pruned_linear(64, 32)) for _ in range(2))
    x = torch.randn(16, 64)
    assert sl.set_graphs(torch.nn.Sequential(graphs)) == 1 and graphs.graphs and not eager.graphs
    for layer in (eager, graphs):
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    key = (32, 64, 16, torch.float32, "cpu", True, False)
    assert sl.autotune_choices() == {(*key, False): "sdsengine", (*key, True): "dense"}
    assert graphs._routes[16, torch.float32][0] == "dense" and eager._routes[16, torch.float32][0] == "sdsengine"
    # tuning for graphs kept the form the shape chose eagerly: a model may prefill eagerly and decode as graphs
    assert set(graphs._forms) == {"dense", "sdsengine"}
    graphs.graphs = False  # back to eager: the route decided for graphs is not reused
    assert graphs._routes == {}
    graphs(x)
    assert graphs._routes[16, torch.float32][0] == "sdsengine"


@pytest.mark.filterwarnings("ignore:SparseLinear. backend .(wrong|broken)")
def test_a_layer_set_for_graphs_leaves_out_a_backend_whose_capture_failed(fake_backends, fresh_choices, monkeypatch):
    """Ours fastest but refused by its capture check: a layer set for graphs takes dense, an eager layer never asks."""
    fake_backends.update(sdsengine=(1.0, 1.0), wrong=5.0, broken=5.0)
    asked = []
    monkeypatch.setattr(ops, "capture_error", lambda backend: asked.append(backend) or (
        "refused" if backend == "sdsengine" else None))
    eager, graphs = (SparseLinear.from_linear(pruned_linear(64, 32)) for _ in range(2))
    graphs.graphs = True
    assert eager._backend_for(2) == "sdsengine" and not asked
    assert graphs._backend_for(2) == "dense" and set(asked) == set(fake_backends)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_autotune_keeps_dense_within_noise(fake_backends, fresh_choices):
    fake_backends.update(sdsengine=1.99, wrong=5.0, broken=5.0)
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    assert layer._backend_for(1) == "dense"  # 0.5% faster is noise, not a win


def test_autotune_without_dense_says_so_and_without_any_backend_fails(fake_backends, fresh_choices, monkeypatch):
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    run = ops.run
    monkeypatch.setattr(ops, "run", lambda backend, *a: run("broken" if backend == "dense" else backend, *a))
    with pytest.warns(UserWarning, match=r"dense could not run on \(32, 64\) x 1 tokens, so 'sdsengine' is used"):
        assert layer._backend_for(1) == "sdsengine"
    monkeypatch.setattr(ops, "run", lambda backend, *a: run("broken", *a))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"\(32, 64\) x 2 tokens: no backend ran "
                                                                     r"correctly \(tried sdsengine, wrong, broken, dense\)"):
        layer._backend_for(2)


def test_backends_running_one_form_share_its_copy(fake_backends, fresh_choices, monkeypatch):
    """Our two kernels run the same reordered weight: decode on mma.sp and prefill on wgmma.sp hold it once."""
    prepared = []
    monkeypatch.setattr(ops, "prepare", lambda backend, values, meta: (prepared.append(backend),
                                                                        decompress_24(values, meta))[1])
    fake_backends.clear()
    fake_backends.update(sdsengine=1.0, wgmma=1.5, dense=2.0)
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    assert layer._backend_for(1) == "sdsengine"
    fake_backends.update(wgmma=0.5)
    assert layer._backend_for(2048) == "wgmma"
    assert set(layer._forms) == {"sdsengine"} and prepared.count("sdsengine") == 1 and "wgmma" not in prepared


@pytest.fixture
def backends_run(fake_backends, monkeypatch):
    """fake_backends, recording the backend of every SparseLinear call and counting the decisions made."""
    ran, decided = [], []
    run, backend_for = ops.run, SparseLinear._backend_for
    monkeypatch.setattr(ops, "run", lambda backend, *args: (ran.append(backend), run(backend, *args))[1])
    monkeypatch.setattr(SparseLinear, "_backend_for",
                        lambda self, tokens: (decided.append(tokens), backend_for(self, tokens))[1])
    return ran, decided


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_repeated_call_reuses_its_route_until_a_decision_may_change(backends_run, fresh_choices):
    ran, decided = backends_run
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    x = torch.randn(3, 64)
    for _ in range(3):
        layer(x)
    assert decided == [3] and ran[-3:] == ["sdsengine"] * 3  # one decision (tuning ran other backends)
    with use_backend("dense"):
        layer(x)
        layer(x)
    layer(x)
    assert decided == [3, 3, 3] and ran[-3:] == ["dense", "dense", "sdsengine"]
    sl.clear_autotune_cache()
    layer(x)
    assert decided == [3, 3, 3, 3]
    layer.load_state_dict(layer.state_dict())
    layer(x)
    assert decided == [3, 3, 3, 3, 3]


def test_routes_are_kept_per_dtype_and_a_wrong_dtype_is_named():
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    layer(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="input dtype torch.float16 differs from weight dtype torch.float32"):
        layer(torch.randn(2, 64, dtype=torch.float16))
    assert layer(torch.randn(0, 5, 64)).shape == (0, 5, 32)


def test_a_layer_remembers_a_bounded_number_of_routes():
    """Routes are kept per exact token count: a layer serving every prompt length must not grow without
    bound (~190 B each, per layer), and its output stays right when it starts over."""
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    for tokens in range(1, 3 * sl.MAX_ROUTES):
        x = torch.randn(tokens, 64)
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
        assert len(layer._routes) <= sl.MAX_ROUTES


def test_no_route_is_remembered_while_capturing_before_tuning(fake_backends, fresh_choices, monkeypatch):
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    x = torch.randn(3, 64)
    monkeypatch.setattr(ops, "capturing", lambda: True)
    with pytest.warns(UserWarning, match="prepared inside CUDA-graph capture, so every replay prepares it again"):
        layer(x)  # provisional: dense, untimed, from a form the graph would make on every replay
    assert sl.autotune_choices() == {} and layer._routes == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # the form is there now: nothing to warn about
    monkeypatch.setattr(ops, "capturing", lambda: False)
    with pytest.warns(UserWarning):
        layer(x)  # tuned now
    assert set(sl.autotune_choices().values()) == {"sdsengine"}


# ---------------------------------------------------------------------------------------------------
# convert and checkpoints
# ---------------------------------------------------------------------------------------------------

def test_a_converted_checkpoint_never_loads_as_random_weights(tmp_path):
    """transformers took a compressed checkpoint's directory (or a converted model's save_pretrained) for a
    dense one and filled every compressed linear with random weights, without an error: the weights file
    has its own name, and a converted model's save_pretrained is refused; an older checkpoint still loads."""
    model = convert(tiny_llama().half())
    with pytest.raises(TypeError, match="is saved with sdsengine.save_compressed"):
        model.save_pretrained(tmp_path / "hf")
    out = save_compressed(model, tmp_path / "ckpt")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)
    loaded = load_compressed(out)
    with pytest.raises(TypeError, match="is saved with sdsengine.save_compressed"):
        loaded.save_pretrained(tmp_path / "hf")
    (out / "sdsengine_compressed.safetensors").rename(out / "model.safetensors")  # as written before 12-02
    torch.testing.assert_close(logits(load_compressed(out), tokens()), logits(loaded, tokens()), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converting again: no "none of the linears is converted" warning
        convert(model)


def test_sparse_linear_is_a_drop_in_at_the_edges():
    """Where it differed from nn.Linear: an empty batch lost autograd and the dtype check; under autocast to
    another dtype the input was first rounded to the layer's (fp16 overflowed to inf); a new .weight raised
    a KeyError; training a converted layer was silent."""
    linear = pruned_linear(64, 32, dtype=torch.bfloat16)
    sparse = SparseLinear.from_linear(linear).eval()
    empty = torch.zeros(0, 64, dtype=torch.bfloat16, requires_grad=True)
    y = sparse(empty)
    assert y.shape == (0, 32) and y.grad_fn is not None
    with pytest.raises(RuntimeError):
        sparse(torch.zeros(0, 64))  # float32 into a bfloat16 layer: refused, as nn.Linear does
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.float16):
        got, want = sparse(x), linear(x)
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="holds its weight compressed"):
        sparse.weight = nn.Parameter(linear.weight.detach().clone())
    sparse.train()
    with pytest.warns(UserWarning, match="weights are frozen buffers"):
        sparse(x.bfloat16().requires_grad_())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse(x.bfloat16())  # inference on a layer left in training mode: no warning


def test_convert_tiny_llama_same_logits():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.data += 1.0  # no longer 2:4: must stay dense
    ids = tokens()
    before = logits(model, ids)
    report = []
    assert convert(model, report=report) is model
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    by_name = {r.name: r for r in report}
    assert by_name["lm_head"].reason == "ignored"
    assert "not 2:4" in by_name["model.layers.1.mlp.down_proj"].reason
    assert sum(r.action == "converted" for r in report) == 13
    assert isinstance(model.model.layers[0].self_attn.k_proj, SparseLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)


_VIEWS = {"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::as_strided", "aten::t", "aten::transpose",
          "aten::expand", "aten::detach", "aten::alias"}  # metadata only: no kernel, no copy


def _compute_ops(model, ids):
    """Count of every aten op of one forward that launches work (views left out)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, use_cache=False)
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in _VIEWS)


@pytest.mark.parametrize("n_tokens", [1, 48])
def test_converted_model_runs_the_dense_models_ops(n_tokens):
    """Where dense is chosen, a converted model must launch exactly the dense model's work: no copy, cast or
    extra product per SparseLinear call (the H100 prefill ran at 0.65x dense with dense chosen everywhere;
    whatever caused it, it must not be work SparseLinear adds)."""
    import copy
    model = tiny_llama()
    converted = convert(copy.deepcopy(model))
    ids = torch.randint(0, 128, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    logits(converted, ids)  # first call: routes and the dense form are made outside the profile
    assert _compute_ops(converted, ids) == _compute_ops(model, ids)


def test_convert_gpt2_conv1d_transposes():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                        n_positions=64)).eval()
    for block in model.transformer.h:
        for conv in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            w = conv.weight.data.T  # Conv1D keeps (in, out)
            conv.weight.data = (w * nm_mask(w.abs(), 2, 4)).T.contiguous()
    ids = tokens()
    before = logits(model, ids)
    report = []
    convert(model, report=report)
    assert sum(r.action == "converted" for r in report) == 8
    assert model.transformer.h[0].attn.c_attn.out_features == 192
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_roundtrip(tmp_path, tie):
    model = convert(tiny_llama(tie=tie))
    ids = tokens()
    before = logits(model, ids)
    out = save_compressed(model, tmp_path / "ckpt")
    manifest = json.loads((out / "sdsengine_compressed.json").read_text())
    assert len(manifest["sparse_modules"]) == 14
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                    "sdsengine_compressed.json", "sdsengine_compressed.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    loaded = load_compressed(out)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, SparseLinear)
    torch.testing.assert_close(logits(loaded, ids), before, rtol=0, atol=0)
    skeleton_loaded = load_compressed(out, model=tiny_llama(seed=5, tie=tie))
    torch.testing.assert_close(logits(skeleton_loaded, ids), before, rtol=0, atol=0)


def _tied_names(model):
    groups = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(names for names in groups.values() if len(names) > 1)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3", "opt", "gpt2"])
def test_a_checkpoint_loads_without_building_the_dense_model(tmp_path, monkeypatch, family):
    """The model is built from its config with every parameter on the meta device, so the checkpoint's
    tensors are the only weights ever allocated; it computes exactly what was saved, with the same ties
    (gemma, opt and gpt2 tie their embeddings and head; save_model stores a tied tensor once)."""
    from sdsengine import MagnitudeConfig, prune
    from tiny_models import VOCAB, tiny_model
    model = tiny_model(family)
    prune(model, MagnitudeConfig(sparsity="2:4"), None, progress=False)
    convert(model)
    ids = tokens(vocab=VOCAB)
    expected = logits(model, ids)
    out = save_compressed(model, tmp_path / "ckpt")
    on_meta = []  # whether each model built from a config held its parameters on the meta device

    def build(*args, **kwargs):
        built = from_config(*args, **kwargs)
        on_meta.append(all(p.is_meta for p in built.parameters()))
        return built
    from_config = AutoModelForCausalLM.from_config
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", build)
    loaded = load_compressed(out)
    assert on_meta == [True]
    assert not [n for n, t in (*loaded.named_parameters(), *loaded.named_buffers()) if t.is_meta]
    assert _tied_names(loaded) == _tied_names(model)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def _rewrite_weights(out, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(out / "sdsengine_compressed.safetensors")
    edit(state)
    save_file(state, out / "sdsengine_compressed.safetensors")


def test_stored_tensors_take_the_dtype_the_model_holds(tmp_path):
    """As the copy into preallocated tensors did: int64 metadata becomes the int32 the kernels read, fp32
    values in a bf16 checkpoint bf16; a float where the model holds integers is refused by name."""
    out = save_compressed(convert(tiny_llama().to(torch.bfloat16)), tmp_path / "ckpt")
    ids = tokens()
    expected = logits(load_compressed(out), ids)
    name = "model.layers.0.mlp.up_proj"
    _rewrite_weights(out, lambda state: state.update({f"{name}.meta": state[f"{name}.meta"].long(),
                                                      f"{name}.values": state[f"{name}.values"].float()}))
    loaded = load_compressed(out)
    assert (loaded.model.layers[0].mlp.up_proj.meta.dtype, loaded.model.layers[0].mlp.up_proj.values.dtype) == (
        torch.int32, torch.bfloat16)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    _rewrite_weights(out, lambda state: state.update({f"{name}.meta": state[f"{name}.meta"].float()}))
    with pytest.raises(ValueError, match=rf"{name}.meta is stored as torch.float32, but the model holds torch.int32"):
        load_compressed(out)


def test_a_file_that_unties_what_the_model_ties_is_refused(tmp_path):
    out = save_compressed(convert(tiny_llama(tie=True)), tmp_path / "ckpt")
    _rewrite_weights(out, lambda state: state.update({"model.embed_tokens.weight": state["lm_head.weight"] * 3}))
    with pytest.raises(ValueError, match="lm_head.weight and model.embed_tokens.weight are one tensor in the model "
                                         r"\(tied\) but differ in the file|model.embed_tokens.weight and "
                                         r"lm_head.weight are one tensor"):
        load_compressed(out)


def test_a_skeleton_without_weights_loads_with_its_ties(tmp_path):
    """A skeleton built under accelerate's init_empty_weights holds no weights, but comes untied."""
    accelerate = pytest.importorskip("accelerate")
    from tiny_models import VOCAB, tiny_model
    model = convert(tiny_model("gpt2"))  # ties its embedding and head
    ids = tokens(vocab=VOCAB)
    expected = logits(model, ids)
    out = save_compressed(model, tmp_path / "ckpt")
    with accelerate.init_empty_weights():
        skeleton = tiny_model("gpt2")
    loaded = load_compressed(out, model=skeleton)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_a_load_that_fails_leaves_the_skeleton_given_as_it_was(tmp_path):
    """A skeleton of another size (a layer more): the load is refused, and the caller's model keeps its own
    modules and weights (load_state_dict assigns what matches before its strict check refuses, which left
    the checkpoint's layers in the skeleton's, a working hybrid of two models)."""
    out = save_compressed(convert(tiny_llama()), tmp_path / "ckpt")
    skeleton = tiny_llama(seed=1)
    skeleton.model.layers.append(tiny_llama(seed=2).model.layers[0])
    ids = tokens()
    before, tensors = logits(skeleton, ids), dict(skeleton.state_dict(keep_vars=True))
    with pytest.raises(ValueError, match="(?s)does not load: .*Missing key"):
        load_compressed(out, model=skeleton)
    assert not any(isinstance(m, SparseLinear) for m in skeleton.modules())
    assert all(t is tensors[name] for name, t in skeleton.state_dict(keep_vars=True).items())
    torch.testing.assert_close(logits(skeleton, ids), before, rtol=0, atol=0)


def test_a_half_precision_checkpoint_loads_in_its_own_dtype_unless_asked(tmp_path):
    """The sparse kernels run fp16/bf16 only: evaluating a packed fp16 model must not upcast it by default."""
    from sdsengine.models import load_model
    from tiny_models import save_tiny_tokenizer
    out = save_compressed(convert(tiny_llama().half()), tmp_path / "ckpt")
    save_tiny_tokenizer(out)
    model, _, _ = load_model(out, compressed_ok=True)
    assert model.model.layers[0].mlp.up_proj.values.dtype == torch.float16
    model, _, _ = load_model(out, torch.float32, compressed_ok=True)
    assert model.model.layers[0].mlp.up_proj.values.dtype == torch.float32


def test_sampling_defaults_survive_the_checkpoint(tmp_path):
    model = convert(tiny_llama())
    model.generation_config.temperature, model.generation_config.do_sample = 0.3, True
    loaded = load_compressed(save_compressed(model, tmp_path / "ckpt"))
    assert loaded.generation_config.temperature == 0.3 and loaded.generation_config.do_sample


def test_the_models_dtype_survives_the_checkpoint(tmp_path):
    """Dense tensors keep the saved dtype: with nothing converted (it was float32), and in a skeleton of
    another dtype (the dense tensors kept the skeleton's, so the forward mixed dtypes)."""
    nothing = save_compressed(tiny_llama().to(torch.bfloat16), tmp_path / "dense")  # not converted
    assert next(load_compressed(nothing).parameters()).dtype == torch.bfloat16
    model = convert(tiny_llama().half())
    out = save_compressed(model, tmp_path / "half")
    loaded = load_compressed(out, model=tiny_llama(seed=5))
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.float16}


def test_a_checkpoint_loaded_in_another_dtype_computes_as_the_pruned_model_loaded_in_it(tmp_path):
    """eval --dtype bfloat16 of an fp32 compressed checkpoint equals eval --dtype bfloat16 of the pruned model
    it came from: the checkpoint's tensors are cast, not the model's own rotary frequencies, which
    transformers keeps in fp32 (a cast of the whole model rounded them and changed every logit)."""
    from sdsengine import MagnitudeConfig, prune
    from sdsengine.models import load_model
    from tiny_models import VOCAB, save_tiny_tokenizer, tiny_model
    model = tiny_model("llama")
    prune(model, MagnitudeConfig(sparsity="2:4"), None, progress=False)
    model.save_pretrained(tmp_path / "pruned")
    save_tiny_tokenizer(tmp_path / "pruned")
    with pytest.warns(UserWarning, match="float32 SparseLinears"):
        packed = save_compressed(convert(model), tmp_path / "packed")
    save_tiny_tokenizer(packed)
    ids = tokens(vocab=VOCAB)
    pruned, _, _ = load_model(tmp_path / "pruned", torch.bfloat16)
    loaded, _, _ = load_model(packed, torch.bfloat16, compressed_ok=True, device="cpu")
    assert loaded.model.rotary_emb.inv_freq.dtype == pruned.model.rotary_emb.inv_freq.dtype
    assert loaded.model.layers[0].mlp.up_proj.values.dtype == torch.bfloat16
    torch.testing.assert_close(logits(loaded, ids), logits(pruned, ids), rtol=0, atol=0)


def test_convert_says_when_nothing_converts_and_takes_one_pattern_as_a_string():
    dense = AutoModelForCausalLM.from_config(tiny_llama().config)  # not pruned
    with pytest.warns(UserWarning, match=r"none of the 15 linear layers is converted \(ignored; not 2:4\)"):
        convert(dense)
    model = convert(tiny_llama(), ignore="*up_proj")
    assert not isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)


def test_a_convert_that_fails_midway_leaves_the_model_as_it_was(monkeypatch):
    """Every replacement is made before any is put in place: a failure at the third linear (here a stand-in
    for a layer offloaded to the meta device, or Ctrl-C) left two converted, and transformers'
    save_pretrained then wrote a checkpoint that loads those two with random weights."""
    import importlib
    convert_module = importlib.import_module("sdsengine.nn.convert")  # the module, not the function
    model, made = tiny_llama(), []
    real = SparseLinear.from_dense

    def fails_third(*args, **kwargs):
        made.append(1)
        if len(made) == 3:
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return real(*args, **kwargs)
    monkeypatch.setattr(convert_module.SparseLinear, "from_dense", fails_third)
    with pytest.raises(RuntimeError, match="meta tensors"):
        convert(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert "save_pretrained" not in vars(model)  # transformers' own, as before the call


def test_convert_warns_that_float32_runs_dense():
    """prune's default dtype is float32, where every sparse kernel refuses: the CLI converts in bfloat16,
    the Python API says so."""
    with pytest.warns(UserWarning, match="float32 SparseLinears always run the dense fallback"):
        convert(tiny_llama())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(tiny_llama().to(torch.bfloat16))


def test_a_module_under_two_names_is_replaced_under_both():
    model = tiny_llama()
    shared = model.model.layers[0].mlp.up_proj
    model.model.layers[1].mlp.up_proj = shared
    report = []
    convert(model, report=report)
    assert model.model.layers[0].mlp.up_proj is model.model.layers[1].mlp.up_proj
    assert isinstance(model.model.layers[1].mlp.up_proj, SparseLinear)
    assert [r.name for r in report].count("model.layers.0.mlp.up_proj") == 1 and len(report) == 14


def test_weight_bytes_counts_what_each_form_holds():
    """A converted model holds its compressed weights (values and meta: 9/16 of fp16, 17/32 of fp32), then
    on the CPU the dense decompression beside them once it has run; a module under two names, or a weight
    shared by two modules, counts once; a tensor-subclass form (PyTorch's semi-structured one) counts by its
    inner tensors."""
    from torch.testing._internal.two_tensor import TwoTensor
    a, b = nn.Linear(64, 32), nn.Linear(64, 32)
    b.weight = a.weight
    assert sl.weight_bytes(nn.Sequential(a, b)) == {"dense": 4 * 32 * 64, "compressed": 0, "forms": 0}
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj = model.model.layers[0].mlp.up_proj
    dense = sl.weight_bytes(model)["dense"]  # the pruned model's nn.Linear weights, lm_head and the twin once
    per_layer = 4 * (64 * 64 * 2 + 64 * 32 * 2 + 128 * 64 * 3)  # q, o; k, v; gate, up, down (fp32)
    lm_head = 4 * 128 * 64
    assert dense == 2 * per_layer + lm_head - 4 * 128 * 64  # the twin up_proj counted once
    convert(model)
    held = sl.weight_bytes(model)
    assert held == {"dense": lm_head, "compressed": (dense - lm_head) * 17 // 32, "forms": 0}
    model(tokens())
    assert sl.weight_bytes(model)["forms"] == dense - lm_head  # the CPU's dense form of every layer
    layer = model.model.layers[0].self_attn.q_proj
    layer._forms["cutlass"] = TwoTensor(torch.zeros(4), torch.zeros(4))  # a stand-in: 16 + 16 bytes
    assert sl.weight_bytes(model)["forms"] == dense - lm_head + 32


def test_a_lean_model_holds_no_dense_copy_and_computes_the_same():
    model = convert(tiny_llama())
    ids = tokens()
    expected = logits(model, ids)
    compressed = sl.weight_bytes(model)["compressed"]
    assert sl.weight_bytes(model)["forms"] == compressed * 32 // 17  # fp32: the dense copy of every layer
    assert sl.set_lean(model) == 14 and all(m.lean for m in model.modules() if isinstance(m, SparseLinear))
    assert sl.weight_bytes(model)["forms"] == 0  # setting it drops the copies
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    assert sl.weight_bytes(model) == {"dense": 4 * 128 * 64, "compressed": compressed, "forms": 0}
    sl.set_lean(model, False)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    assert sl.weight_bytes(model)["forms"] == compressed * 32 // 17


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_lean_layers_tuning_times_dense_with_its_decompression(fake_backends, fresh_choices, monkeypatch):
    calls = []
    monkeypatch.setattr(sl, "decompress_24", lambda *a, **k: (calls.append(k), decompress_24(*a, **k))[1])
    fake_backends.update(wrong=5.0, broken=5.0)
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    layer.lean = True
    assert layer._backend_for(1) == "sdsengine" and {"trusted": True} in calls  # the timed dense call decompressed
    fake_backends.update(sdsengine=3.0)
    x = torch.randn(256, 64)
    calls.clear()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
    assert sl.autotune_choices()[32, 64, 256, torch.float32, "cpu", True, True, False] == "dense"  # lean apart
    assert not isinstance(layer._forms["dense"], torch.Tensor) and {"trusted": True} in calls


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_lean_layer_gives_its_buffers_up_to_our_kernels_form(fake_backends, fresh_choices):
    fake_backends.update(wrong=5.0, broken=5.0)  # ours (1.0) beats dense (2.0)
    linear = pruned_linear(64, 32)
    layer = SparseLinear.from_linear(linear)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = linear(x)
    layer.lean = True
    torch.testing.assert_close(layer(x), expected)
    assert layer.values.untyped_storage().nbytes() == layer.meta.untyped_storage().nbytes() == 4  # stand-ins
    reordered = (2 * 8 * 32 * 8 + 2 * 1 * 32 * 4) * 4  # 2 row tiles x 1 column block (padded from 64), fp32
    assert sl.weight_bytes(layer) == {"dense": 0, "compressed": 8, "forms": reordered}
    assert all(torch.equal(t, state[k]) for k, t in layer.state_dict().items())
    assert torch.equal(layer.weight, linear.weight.data)
    fake_backends.update(sdsengine=3.0)  # another token count, where dense wins: decompressed from our form
    x300 = torch.randn(300, 64)
    torch.testing.assert_close(layer(x300), linear(x300).detach())
    # tensors swapped in and out by torch.func, then our stand-ins back: the weight is still there
    torch.testing.assert_close(torch.func.functional_call(layer, state, (x,)), expected)
    torch.testing.assert_close(layer(x), expected)
    layer.load_state_dict(state)  # a reload fills real buffers, released again on the next call
    assert layer.values.untyped_storage().nbytes() == 32 * 32 * 4
    torch.testing.assert_close(layer(x), expected)
    assert layer.values.untyped_storage().nbytes() == 4
    layer.double()  # a move takes the weight along
    torch.testing.assert_close(layer(x.double()), expected.double(), rtol=1e-5, atol=1e-6)
    layer.lean = False
    assert torch.equal(layer.values, state["values"].double()) and torch.equal(layer.meta, state["meta"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_lean_layer_released_under_inference_mode_works_outside_it(fake_backends, fresh_choices):
    """zero-shot evaluation runs under inference_mode: stand-ins made there could not track versions."""
    linear = pruned_linear(64, 32)
    layer = SparseLinear.from_linear(linear)
    layer.lean = True
    x = torch.randn(3, 64)
    with torch.inference_mode():
        layer(x)
    assert layer.values.untyped_storage().nbytes() == 4
    torch.testing.assert_close(layer(x), linear(x).detach())
    with torch.inference_mode():
        layer.lean = False  # the buffers rebuilt there are ordinary tensors too
    torch.testing.assert_close(layer(x), linear(x).detach())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_lean_layer_first_called_in_capture_keeps_its_buffers(fake_backends, fresh_choices, monkeypatch):
    """A graph captured then reads the buffers (dense, decompressing them): freeing them later would leave it
    reading freed memory."""
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    layer.lean = True
    monkeypatch.setattr(ops, "capturing", lambda: True)
    layer(torch.randn(3, 64))
    monkeypatch.setattr(ops, "capturing", lambda: False)
    layer(torch.randn(3, 64))
    layer(torch.randn(100, 64))
    layer.lean = False
    layer.lean = True  # leaving lean and coming back does not unpin: the graph still reads them
    layer(torch.randn(3, 64))
    assert layer.values.untyped_storage().nbytes() == 32 * 32 * 4


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("released", [False, True])
def test_a_lean_layer_is_freed_without_the_garbage_collector(released, request):
    """Its dense form refers to tensors, not to the module: no reference cycle keeps the weights alive,
    whether they are the buffers (the CPU) or our kernel's form (released)."""
    import gc
    import weakref
    if released:
        request.getfixturevalue("fresh_choices")
        request.getfixturevalue("fake_backends").update(sdsengine=3.0, wrong=5.0, broken=5.0)  # dense chosen
    layer = SparseLinear.from_linear(pruned_linear(64, 32))
    layer.lean = True
    layer(torch.randn(3, 64))
    assert (layer._released is not None) == released and "dense" in layer._forms
    gone = weakref.ref(layer._released[2][0] if released else layer.values)
    gc.disable()
    try:
        del layer
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_lean_model_saves_and_loads_what_its_kernel_form_holds(fake_backends, fresh_choices, tmp_path):
    fake_backends.update(wrong=5.0, broken=5.0)
    model = convert(tiny_llama())
    expected = logits(model, tokens())
    sl.set_lean(model)
    torch.testing.assert_close(logits(model, tokens()), expected)
    assert sl.weight_bytes(model)["compressed"] == 14 * 8  # every layer on ours, its buffers given up
    loaded = load_compressed(save_compressed(model, tmp_path / "ckpt"))
    torch.testing.assert_close(logits(loaded, tokens()), expected)


def test_a_converted_model_is_not_pruned_again():
    from sdsengine import MagnitudeConfig, prune
    with pytest.raises(ValueError, match="holds SparseLinear layers"):
        prune(convert(tiny_llama()), MagnitudeConfig(sparsity="2:4"), None, progress=False)


def test_save_refuses_non_empty_dir_but_fills_an_empty_one(tmp_path):
    model = convert(tiny_llama())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty and holds no model checkpoint"):
        save_compressed(model, tmp_path / "full", overwrite=True)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert (save_compressed(model, tmp_path / "empty") / "sdsengine_compressed.safetensors").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    conv = importlib.import_module("sdsengine.nn.convert")  # the package attribute is the function

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(conv, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(convert(tiny_llama()), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# GPU: every backend through SparseLinear, and the autotuner
# ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_tokens", [1, 3, 7, 13, 17, 100])
def test_forced_backend_matches_dense(backend, dtype, n_tokens):
    linear = pruned_linear(512, 384, dtype=dtype).cuda()
    sparse = SparseLinear.from_linear(linear)
    if backend not in ops.available("cuda", dtype):
        pytest.skip(ops.probe("cuda", dtype)["backends"][backend])
    x = torch.randn(1, n_tokens, 512, device="cuda", dtype=dtype)
    with use_backend(backend), torch.no_grad():
        try:
            y = sparse(x)
        except ops.BackendUnavailable as exc:
            pytest.skip(str(exc))
        ref = linear(x)
    scale = ref.abs().max().item()
    assert (y.float() - ref.float()).abs().max().item() <= 2e-2 * scale, backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_forced_backend_passes_the_gradient_to_its_input(backend):
    """On every backend an input that requires grad gets nn.Linear's gradient (through the dense weight where the
    backend has no backward)."""
    linear = pruned_linear(512, 384, dtype=torch.float16).cuda()
    sparse = SparseLinear.from_linear(linear)
    if backend not in ops.available("cuda", torch.float16):
        pytest.skip(ops.probe("cuda", torch.float16)["backends"][backend])
    x = torch.randn(7, 512, device="cuda", dtype=torch.float16, requires_grad=True)
    with use_backend(backend):
        sparse(x).float().sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(7, -1), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autotune_picks_a_correct_backend_once(dtype, fresh_choices):
    linear = pruned_linear(1024, 1024, dtype=dtype).cuda()
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(5, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        y = sparse(x)
        torch.testing.assert_close(y.float(), linear(x).float(), rtol=2e-2, atol=2e-2 * linear(x).abs().max().item())
    choices = sl.autotune_choices()
    assert len(choices) == 1
    (key, backend), = choices.items()
    assert key[2] == 8 and backend in ops.available("cuda", dtype)
    assert set(sparse._forms) == {ops.form_key(backend)}  # the other prepared forms were released
    sparse(x[:3].repeat(2, 1))  # 6 tokens: the same bucket, no second tuning
    assert sl.autotune_choices() == choices
    sparse(x[:3])  # bucket 4: tuned on its own
    assert len(sl.autotune_choices()) == 2


@pytest.mark.gpu
def test_converted_model_on_gpu_matches_dense(fresh_choices):
    model = tiny_llama().cuda().half()
    ids = tokens().cuda()
    before = logits(model, ids)
    convert(model)
    after = logits(model, ids)
    torch.testing.assert_close(after.float(), before.float(), rtol=2e-2, atol=2e-2)
    for backend in ops.available("cuda", torch.float16):  # the tuner may have chosen dense for these tiny layers
        with use_backend(backend):
            try:
                forced = logits(model, ids)
            except ops.BackendUnavailable:  # a library's shape limit (ours take every shape here)
                if backend in ("cusparselt", "cutlass"):
                    continue
                raise
            torch.testing.assert_close(forced.float(), before.float(), rtol=2e-2, atol=2e-2,
                                       msg=lambda m, b=backend: f"{b}: {m}")
    assert nm_violations(model.model.layers[0].mlp.up_proj.weight, 2, 4) == 0
    state = {k: t.clone() for k, t in model.state_dict().items()}
    sl.set_lean(model)  # tuned again, apart: its dense backend decompresses on every call
    torch.testing.assert_close(logits(model, ids).float(), before.float(), rtol=2e-2, atol=2e-2)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert not any(isinstance(m._forms.get("dense"), torch.Tensor) for m in layers)
    assert all(m.values.untyped_storage().nbytes() == 2 for m in layers if "sdsengine" in m._forms)  # given up
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ops.BACKENDS if b != "cutlass"])  # PyTorch's subclass: its support
def test_a_compiled_layer_is_one_graph_on_every_backend(backend, fresh_choices):
    """Compiled, a layer is one graph (the op sdsengine::sparse_linear), with no break, and gives the eager result
    on every backend it can be forced onto."""
    import torch._dynamo as dynamo
    if backend not in ops.available("cuda", torch.float16):
        pytest.skip(ops.probe("cuda", torch.float16)["backends"][backend])
    linear = pruned_linear(512, 384, dtype=torch.float16).cuda()
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(1, 7, 512, device="cuda", dtype=torch.float16)
    with use_backend(backend), torch.no_grad():
        try:
            eager = sparse(x)
        except ops.BackendUnavailable as exc:
            pytest.skip(str(exc))
        explained = dynamo.explain(sparse)(x)
        dynamo.reset()
        # aot_eager: the op traced and run as inductor would get it, without inductor's compile per backend
        # (the converted model's test below compiles with inductor)
        compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)(x)
        dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())


@pytest.mark.gpu
def test_a_converted_model_compiles_and_matches_eager(fresh_choices):
    """torch.compile (inductor) of a converted model on our kernel (forced: the tuner picks dense for layers this
    small), routed by an eager call first: the same logits."""
    import torch._dynamo as dynamo
    if "sdsengine" not in ops.available("cuda", torch.float16):
        pytest.skip(ops.probe("cuda", torch.float16)["backends"]["sdsengine"])
    model = convert(tiny_llama().cuda().half())
    ids = tokens().cuda()
    with use_backend("sdsengine"):
        eager = logits(model, ids)
        compiled = logits(torch.compile(model), ids)
    dynamo.reset()
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_a_checkpoint_loads_straight_onto_the_gpu(tmp_path, fresh_choices):
    out = save_compressed(convert(tiny_llama().half()), tmp_path / "ckpt")
    ids = tokens()
    expected = logits(load_compressed(out), ids)
    loaded = load_compressed(out, device="cuda")
    off = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.device.type != "cuda"]
    assert not off, f"left on the CPU: {off}"
    assert loaded.lm_head.weight.device.type == "cuda"
    torch.testing.assert_close(logits(loaded, ids.cuda()).float().cpu(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_a_checkpoint_loads_into_a_skeleton_on_the_gpu(tmp_path, fresh_choices):
    model = convert(tiny_llama().half())
    ids = tokens()
    before = logits(model, ids)
    loaded = load_compressed(save_compressed(model, tmp_path / "ckpt"), model=tiny_llama(seed=5).cuda())
    off = [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.device.type != "cuda"]
    assert not off, f"left on the CPU: {off}"
    torch.testing.assert_close(logits(loaded, ids.cuda()).float().cpu(), before.float(), rtol=2e-2, atol=2e-2)


def _replayed(layer, x):
    """layer's output on a new x from a CUDA graph captured after eager warm-ups (where tuning, forms and
    cuSPARSELt's algorithm search happen), and the x it was given."""
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.no_grad():
        layer(x)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            y = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    return y, x


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_every_backend_a_layer_set_for_graphs_may_take_replays_in_a_cuda_graph(backend, fresh_choices):
    """Each backend forced, captured and replayed on a new input, against dense. A library backend is captured here
    only once its child-process check passed (ops.capture_error): a refused capture can leave torch's allocator
    broken for the rest of this process; where that check failed, layers set for graphs leave it out."""
    dtype = torch.float16
    if backend not in ops.available("cuda", dtype):
        pytest.skip(ops.probe("cuda", dtype)["backends"][backend])
    refused = ops.capture_error(backend)
    if refused:
        pytest.skip(refused)
    linear = pruned_linear(1024, 512, dtype=dtype).cuda()
    sparse = SparseLinear.from_linear(linear)
    with use_backend(backend):
        try:
            y, x = _replayed(sparse, torch.randn(13, 1024, device="cuda", dtype=dtype))
        except ops.BackendUnavailable as exc:
            pytest.skip(str(exc))
    ref = linear(x).detach()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
def test_a_layer_set_for_graphs_tunes_by_gpu_time_and_replays(fresh_choices):
    """On the GPU: the graphs decision is its own entry, and the layer's choice replays in a graph."""
    linear = pruned_linear(4096, 1024, bias=False, dtype=torch.float16).cuda()
    sparse = SparseLinear.from_linear(linear)
    sl.set_graphs(sparse)
    y, x = _replayed(sparse, torch.randn(16, 4096, device="cuda", dtype=torch.float16))
    (key, backend), = sl.autotune_choices().items()
    assert key[-1] is True and backend in ops.available("cuda", torch.float16)
    ref = linear(x).detach()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
def test_a_layer_first_called_inside_cuda_graph_capture(fresh_choices):
    """Untuned, inside capture the layer runs dense from a form made there, with a warning: nothing on that
    path may synchronize (decompress_24's metadata check skips itself during capture)."""
    linear = pruned_linear(256, 128, dtype=torch.float16).cuda()
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with pytest.warns(UserWarning, match="every replay prepares it again"):
        with torch.no_grad(), torch.cuda.stream(stream), torch.cuda.graph(graph):
            y = sparse(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, linear(x), rtol=1e-2, atol=1e-2)
