"""--sequential linear: a layer's linears pruned group by group, each on inputs from the pruned ones before it."""
import copy

import pytest
import torch

import sdsengine
from sdsengine.algorithms.stats import Hessian
from sdsengine.config import BESAConfig, SDSConfig, SparseGPTConfig
from sdsengine.masks import nm_violations
from sdsengine.pipeline import adapters, sequential
from sdsengine.pipeline.capture import capture_layer_inputs
from sdsengine.pipeline.sequential import collect_stats, linear_groups, run_layer
from tiny_models import tiny_model, tiny_tokens

GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "phi3": [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
}


def _layer0(model, samples):
    inps, kwargs = capture_layer_inputs(model, samples, torch.device("cpu"), torch.device("cpu"))
    return adapters.decoder_layers(model)[0], inps, kwargs[0]


@pytest.mark.parametrize("family", sorted(GROUPS))
def test_groups_follow_the_forward_and_its_shared_inputs(family):
    model = tiny_model(family)
    layer, inps, kwargs = _layer0(model, tiny_tokens(1, 16))
    groups = linear_groups(layer, adapters.linear_modules(layer), inps, kwargs, "cpu")
    assert [sorted(g) for g in groups] == [sorted(g) for g in GROUPS[family]]


@pytest.mark.parametrize("family", sorted(GROUPS))
def test_linears_reading_one_input_share_its_statistics(family):
    """q/k/v (and gate/up) read one tensor: they end up with one Hessian, fed once per window, equal to the
    one each linear's own inputs give."""
    samples = 3
    layer, inps, kwargs = _layer0(tiny_model(family), tiny_tokens(samples, 16))
    targets = adapters.linear_modules(layer)
    width = {name: adapters.get_weight(m).shape[1] for name, m in targets.items()}
    expected = {name: Hessian(width[name], "cpu") for name in targets}
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: expected[name].add_batch(a[0]))
             for name, m in targets.items()]
    run_layer(layer, inps, None, kwargs, "cpu")
    for h in hooks:
        h.remove()
    stats = {name: Hessian(width[name], "cpu") for name in targets}
    collect_stats(layer, targets, stats, inps, torch.empty_like(inps), kwargs, "cpu")
    for group in GROUPS[family]:
        assert all(stats[name] is stats[group[0]] for name in group)
        assert stats[group[0]].tokens == samples * 16
    assert len({id(s) for s in stats.values()}) == len(GROUPS[family])
    for name in targets:
        torch.testing.assert_close(stats[name].H, expected[name].H)


def test_later_groups_see_the_pruned_earlier_ones(monkeypatch):
    """o_proj's Hessian comes from a forward through the pruned q/k/v; q/k/v (the first group) are pruned
    exactly as in the one-pass mode; the layer's error is still measured against the dense layer."""
    samples = tiny_tokens(3, 16)
    dense = tiny_model("llama")
    seen = {}
    original = sdsengine.algorithms.sparsegpt.prune

    def recording_prune(weight, stats, config):
        seen.setdefault(weight.data_ptr(), stats.H.clone())
        return original(weight, stats, config)

    monkeypatch.setattr(sdsengine.algorithms.sparsegpt, "prune", recording_prune)
    results = {}
    for mode in ("layer", "linear"):
        model = copy.deepcopy(dense)
        seen.clear()
        config = SparseGPTConfig(sparsity="2:4", blocksize=16, sequential=mode)
        results[mode] = (model, sdsengine.prune(model, config, samples, progress=False), dict(seen))
    model, result, hessians = results["linear"]
    one_pass = results["layer"][0].model.layers[0]
    layer = model.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(layer.self_attn, name).weight, getattr(one_pass.self_attn, name).weight)
    assert not torch.equal(layer.self_attn.o_proj.weight, one_pass.self_attn.o_proj.weight)

    # o_proj's inputs, recomputed: dense layer 0 with only q/k/v replaced by their pruned weights
    check = copy.deepcopy(dense)
    dense_layer, inps, kwargs = _layer0(check, samples)
    reference = torch.empty_like(inps)
    run_layer(dense_layer, inps, reference, kwargs, "cpu")
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(dense_layer.self_attn, name).weight.data.copy_(getattr(layer.self_attn, name).weight)
    expected = Hessian(64, "cpu")
    hook = dense_layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: expected.add_batch(a[0]))
    run_layer(dense_layer, inps, torch.empty_like(inps), kwargs, "cpu")
    hook.remove()
    o_proj = layer.self_attn.o_proj.weight
    torch.testing.assert_close(hessians[o_proj.data_ptr()], expected.H)

    # the report's error: pruned layer 0 against the dense layer 0, on the same inputs
    err = run_layer(layer, inps, torch.empty_like(inps), kwargs, "cpu", reference=reference)
    assert result.layers[0].error == pytest.approx(err, rel=1e-5)


def test_the_dense_stream_stays_the_dense_models_in_linear_mode(monkeypatch):
    """SDS --teacher dense fits the dense model's inputs: every linear's dense-stream input, in every group
    and layer, is what that linear reads in the unpruned model, though earlier groups are pruned by then."""
    samples = tiny_tokens(2, 16)
    model = tiny_model("llama")
    expected = {}
    hooks = [m.register_forward_hook(lambda m, a, out, key=(i, name): expected.setdefault(key, []).append(a[0]))
             for i, layer in enumerate(adapters.decoder_layers(model))
             for name, m in adapters.linear_modules(layer).items()]
    with torch.no_grad():
        for window in samples:
            model(window[None])
    for h in hooks:
        h.remove()
    seen = {}
    add_once = sequential._add_once
    monkeypatch.setattr(sequential, "_add_once", lambda stats, name, x, dense_x, fed: (
        seen.setdefault(name, []).append(dense_x), add_once(stats, name, x, dense_x, fed))[1])
    sdsengine.prune(model, SDSConfig(sparsity="2:4", teacher="dense", iters=5, refit=0), samples, progress=False)
    assert set(seen) == set(adapters.linear_modules(adapters.decoder_layers(model)[0]))  # every linear was fed
    for name, inputs in seen.items():
        layers = len(adapters.decoder_layers(model))
        assert len(inputs) == layers * len(samples), name
        for i in range(layers):
            for got, want in zip(inputs[i * len(samples):(i + 1) * len(samples)], expected[(i, name)]):
                torch.testing.assert_close(got, want, msg=f"layer {i} {name}")


def test_a_layer_with_every_linear_ignored_passes_its_inputs_on():
    """Its outputs are the next layer's inputs and its reported error is 0, in both modes."""
    results = {}
    for mode in ("layer", "linear"):
        model = tiny_model("llama")
        config = SparseGPTConfig(sparsity="2:4", blocksize=16, sequential=mode, ignore=("model.layers.0.*",))
        results[mode] = (model, sdsengine.prune(model, config, tiny_tokens(), progress=False))
    for mode, (model, result) in results.items():
        assert result.layers[0].error == 0 and result.layers[1].error > 0, mode
    torch.testing.assert_close(results["linear"][0].model.layers[1].self_attn.q_proj.weight,
                               results["layer"][0].model.layers[1].self_attn.q_proj.weight)
    besa = sdsengine.prune(tiny_model("llama"), BESAConfig(sparsity="0.5", ignore=("model.layers.0.*",)),
                           tiny_tokens(), progress=False)  # a block-wise method is not called for it either
    assert besa.layers[0].error == 0 and besa.layers[1].error > 0


@pytest.mark.parametrize("family", sorted(GROUPS))
def test_linear_mode_end_to_end(family):
    model = tiny_model(family)
    result = sdsengine.prune(model, SparseGPTConfig(sparsity="2:4", blocksize=16, sequential="linear"),
                             tiny_tokens(), progress=False)
    for layer in adapters.decoder_layers(model):
        for name, m in adapters.linear_modules(layer).items():
            assert nm_violations(adapters.get_weight(m), 2, 4) == 0, name
    assert all(r.error is not None and r.error > 0 for r in result.layers)
    assert result.report["recipe"]["sequential"] == "linear"


def test_blockwise_methods_refuse_linear_mode():
    with pytest.raises(ValueError, match="--sequential linear applies to per-linear methods"):
        sdsengine.prune(tiny_model("llama"), BESAConfig(sparsity="0.5", sequential="linear"), tiny_tokens(),
                        progress=False)


def test_unknown_mode_named():
    with pytest.raises(ValueError, match="sequential must be layer or linear"):
        SparseGPTConfig(sequential="block")


def test_cli_takes_the_flag():
    from sdsengine.cli import build_parser
    args = build_parser().parse_args(["prune", "--method", "wanda", "--sparsity", "2:4", "--sequential", "linear",
                                      "--out", "x"])
    assert args.sequential == "linear"


def test_defaults_per_method():
    """SDS defaults to linear (measured, docs/SDS.md) except on BESA's whole-layer masks; others to layer."""
    from sdsengine.config import SDSConfig, WandaConfig
    assert SparseGPTConfig().sequential == WandaConfig().sequential == "layer"
    assert SDSConfig().sequential == "linear" and SDSConfig(base="besa").sequential == "layer"
    assert SDSConfig(sequential="layer").sequential == "layer"
