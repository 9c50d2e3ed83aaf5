"""End to end on tiny random models of each family, and the pipeline's invariants."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine.checkpoint import save_checkpoint
from sdsengine.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from sdsengine.masks import nm_violations
from sdsengine.pipeline import adapters, experts
from sdsengine.pipeline.capture import capture_layer_inputs
from sdsengine.pipeline.sequential import run_layer
from tiny_models import layer_outputs, tiny_config, tiny_model, tiny_tokens

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2"]
# the rarer families: their layers' replay, and one prune each through save, reload and convert (the methods are
# the same code on every family; what differs is where the layers and linears are and how a layer runs)
MORE_FAMILIES = ["olmo2", "granite", "cohere", "starcoder2", "stablelm", "phi", "persimmon", "gpt_neox", "falcon",
                 "bloom", "gptj"]
CONFIGS = [MagnitudeConfig, WandaConfig, SparseGPTConfig]


def _weights(model):
    return {f"{i}.{n}": adapters.get_weight(m) for i, layer in enumerate(adapters.decoder_layers(model))
            for n, m in adapters.linear_modules(layer).items()}


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_replayed_layers_match_plain_forward(family):
    """Capture + layer-by-layer replay reproduces the last layer's output of a plain forward pass
    (catches a KV cache leaking across calibration samples)."""
    model = tiny_model(family)
    samples = tiny_tokens(3, 16)
    inps, kwargs = capture_layer_inputs(model, samples, torch.device("cpu"), torch.device("cpu"))
    outs = torch.empty_like(inps)
    for layer, layer_kwargs in zip(adapters.decoder_layers(model), kwargs):
        run_layer(layer, inps, outs, layer_kwargs, "cpu")
        inps, outs = outs, inps
    torch.testing.assert_close(inps, layer_outputs(model, samples)[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config_class", CONFIGS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "0.5"])
def test_end_to_end_counted(family, config_class, pattern):
    model = tiny_model(family)
    before = _weights(model)
    before = {k: v.clone() for k, v in before.items()}
    config = config_class(sparsity=pattern, **({"blocksize": 16} if config_class is SparseGPTConfig else {}))
    result = sdsengine.prune(model, config, tiny_tokens(), progress=False)
    for name, w in _weights(model).items():
        if config.sparsity.nm:
            assert nm_violations(w, *config.sparsity.nm) == 0, name
            assert (w == 0).float().mean() == 0.5, name
        else:
            assert abs((w == 0).float().mean() - 0.5) < 0.01, name
        assert not torch.equal(w, before[name]), name
    assert len(result.layers) == 2
    assert all(r.error is not None and r.error > 0 for r in result.layers) or config_class is MagnitudeConfig
    logits = model(tiny_tokens(1, 8)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_prune_save_reload_and_convert(family, tmp_path):
    """SparseGPT 2:4 on every linear; the checkpoint reloads with transformers and computes what the pruned model
    did, and so does the model converted to SparseLinear (in bf16, a dtype the sparse kernels take)."""
    model = tiny_model(family)
    result = sdsengine.prune(model, SparseGPTConfig(sparsity="2:4", blocksize=16), tiny_tokens(), progress=False)
    weights = _weights(model)
    assert all(nm_violations(w, 2, 4) == 0 and (w == 0).float().mean() == 0.5 for w in weights.values())
    assert result.report["decoder_sparsity"] == 0.5 and all(r.error > 0 for r in result.layers)
    ids = tiny_tokens(2, 8, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    out = save_checkpoint(model, None, tmp_path / "pruned", result.report)  # what prune --out writes
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, expected, rtol=0, atol=0)
        model = model.to(torch.bfloat16)
        expected = model(ids).logits
        converted = sdsengine.convert(model)
        assert sum(isinstance(m, sdsengine.SparseLinear) for m in converted.modules()) == len(weights)
        torch.testing.assert_close(converted(ids).logits, expected, rtol=0, atol=0)


def test_a_model_in_training_mode_is_pruned_without_dropout_and_left_as_it_came():
    """A model straight from training (or from_config) has dropout on: its calibration forwards were random,
    the masks depending on the global RNG rather than the config. The prune runs in eval mode, and each
    module is left in the mode it came in."""
    weights = []
    for seed in (1, 2):
        config = tiny_config("opt")
        config.dropout = config.attention_dropout = 0.5
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).train()
        model.model.decoder.layers[0].eval()  # a mixed model's modes come back as they were
        torch.manual_seed(seed)
        sdsengine.prune(model, WandaConfig(sparsity="2:4"), tiny_tokens(), progress=False)
        assert model.training and not model.model.decoder.layers[0].training
        weights.append(model.model.decoder.layers[1].fc1.weight)
    assert torch.equal(*weights)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_a_layer_goes_back_home_when_pruning_it_fails(method, monkeypatch):
    """A failure inside a layer (a GPU out of memory, Ctrl-C) must still move the layer back where it was:
    one left on the GPU split the model across devices, and the next prune took the GPU for its home. No
    GPU here: each layer's moves are recorded, and the layer that failed must have gone there and back."""
    from sdsengine.algorithms import magnitude, sparsegpt
    algorithm = {"sparsegpt": sparsegpt, "magnitude": magnitude}[method]
    model, moves, calls = tiny_model("llama"), [], []
    for index, layer in enumerate(model.model.layers):
        def to(*args, layer=layer, index=index, **kwargs):
            moves.append(index)
            return torch.nn.Module.to(layer, *args, **kwargs)
        layer.to = to
    real = algorithm.prune

    def fails_in_layer_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # layer 1's first linear (7 a layer)
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(*args, **kwargs)
    monkeypatch.setattr(algorithm, "prune", fails_in_layer_1)
    config = SparseGPTConfig(sparsity="2:4") if method == "sparsegpt" else MagnitudeConfig(sparsity="2:4")
    with pytest.raises(torch.OutOfMemoryError):
        sdsengine.prune(model, config, tiny_tokens() if method == "sparsegpt" else None, progress=False)
    assert moves.count(1) == 2  # there and back


def test_ignore_keeps_layers_dense():
    model = tiny_model("llama")
    before = adapters.get_weight(model.model.layers[1].mlp.down_proj).clone()
    sdsengine.prune(model, WandaConfig(sparsity="2:4", ignore=("*.1.mlp.*",)), tiny_tokens(), progress=False)
    assert torch.equal(adapters.get_weight(model.model.layers[1].mlp.down_proj), before)
    assert nm_violations(adapters.get_weight(model.model.layers[0].mlp.down_proj), 2, 4) == 0
    assert (model.lm_head.weight != 0).all()


def test_ignoring_a_module_keeps_its_linears_dense_and_the_report_counts_them():
    """A pattern naming a containing module (the MLP) covers its linears; the report's overall_sparsity is
    that of the pruned linears, decoder_sparsity that of every decoder linear, the dense ones included."""
    model = tiny_model("llama")
    before = adapters.get_weight(model.model.layers[1].mlp.up_proj).clone()
    result = sdsengine.prune(model, WandaConfig(sparsity="2:4", ignore=("model.layers.1.mlp",)), tiny_tokens(),
                             progress=False)
    assert torch.equal(adapters.get_weight(model.model.layers[1].mlp.up_proj), before)
    assert "mlp.up_proj" not in result.layers[1].linears and "self_attn.q_proj" in result.layers[1].linears
    sizes = [adapters.get_weight(m).numel() for layer in adapters.decoder_layers(model)
             for m in adapters.linear_modules(layer).values()]
    mlp = model.model.layers[1].mlp
    dense = sum(adapters.get_weight(m).numel() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert result.report["overall_sparsity"] == pytest.approx(0.5)
    assert result.report["decoder_sparsity"] == pytest.approx(0.5 * (sum(sizes) - dense) / sum(sizes))


def test_sparsegpt_beats_magnitude_on_reconstruction():
    errs = {}
    for cls in (WandaConfig, SparseGPTConfig):
        model = tiny_model("llama")
        res = sdsengine.prune(model, cls(sparsity="2:4"), tiny_tokens(8, 32), progress=False)
        errs[cls.method] = res.layers[0].error
    assert errs["sparsegpt"] < errs["wanda"]


def test_unsupported_layout_named():
    from transformers import BertConfig, BertForMaskedLM
    model = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    with pytest.raises(ValueError, match="unsupported model layout 'bert'"):
        sdsengine.prune(model, WandaConfig(), tiny_tokens())


def test_a_convolution_kernel_is_not_called_a_mixture_of_experts():
    """Mamba's conv1d kernel, (channels, 1, width), is 3-D as fused experts are: the refusal called Mamba a
    mixture-of-experts model."""
    from transformers import MambaConfig
    model = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=32,
                                                         state_size=4, expand=2))
    with pytest.raises(ValueError, match=r"unsupported model layout 'mamba'; supported: "):
        sdsengine.prune(model, MagnitudeConfig(sparsity="2:4"), progress=False)


def test_weights_outside_linears_are_refused_not_left_dense(monkeypatch):
    """A layout whose layers hold fused expert banks (3-D parameters, no nn.Linear) that experts.py does not know:
    pruning only the attention left the experts, most of the weights, dense while the report said 0.5 overall and
    over the decoder."""
    monkeypatch.setattr(experts, "is_fused_experts", lambda module: False)
    model = tiny_model("mixtral")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match=r"6 weight\(s\) of the decoder layers sit outside nn.Linear, such as "
                                         r"model\.layers\.0\.mlp\.gate\.weight of shape \(4, 64\)"):
        sdsengine.prune(model, MagnitudeConfig(sparsity="2:4"), progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # refused before any work


def test_columns_not_divisible_by_m():
    with pytest.raises(ValueError, match="not divisible by M=8"):
        sdsengine.prune(_odd_model(), WandaConfig(sparsity="4:8"), tiny_tokens(), progress=False)


def _odd_model():
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=96, hidden_size=36, intermediate_size=60, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_seqlen_above_model_maximum():
    with pytest.raises(ValueError, match="exceeds the model's maximum of 128"):
        sdsengine.prune(tiny_model("llama"), WandaConfig(), tiny_tokens(2, 200), progress=False)


class _RecordConfig(sdsengine.PruneConfig):
    method = "record-dense-stream"


class _RecordDenseStream:
    """A block-wise method that asks for the dense stream, records what it gets, and prunes by magnitude
    (so that the pruned stream drifts away from the dense one)."""
    from sdsengine.algorithms.stats import Hessian as STATS

    def __init__(self):
        self.dense_outs, self.cross = [], []

    def needs_dense_stream(self, config):
        return True

    def prune_layer(self, ctx, config):
        self.dense_outs.append(ctx.dense_outs.clone())
        stats = ctx.stats["mlp.up_proj"]
        self.cross.append((stats.C.clone(), stats.H.clone()))
        for module in ctx.targets.values():
            w = adapters.get_weight(module)
            adapters.set_weight(module, w * (w.abs() > w.abs().median()))


def test_dense_stream_carries_the_unpruned_model(monkeypatch):
    """ctx.dense_outs of every layer equals that layer's output in the unpruned model, while the pruned
    stream differs; in layer 0 both streams see the same inputs, so C = H there."""
    method = _RecordDenseStream()
    monkeypatch.setitem(sdsengine.algorithms.METHODS, _RecordConfig.method, (_RecordConfig, method))
    dense, model = tiny_model("llama"), tiny_model("llama")
    samples = tiny_tokens(3, 16)
    seen = layer_outputs(dense, samples)
    sdsengine.prune(model, _RecordConfig(sparsity="0.5"), samples, progress=False)
    for i, recorded in enumerate(method.dense_outs):
        torch.testing.assert_close(recorded, seen[i], atol=1e-5, rtol=1e-5)
    C0, H0 = method.cross[0]
    torch.testing.assert_close(C0, H0)
    C1, H1 = method.cross[1]
    assert not torch.allclose(C1, H1, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_a_plan_prunes_nothing_and_is_the_same_for_a_skeleton(family):
    """sdsengine.plan: the model's weights untouched, the same plan from its skeleton (no weights), and the linears
    it counts are the ones a prune then prunes (a mixture's experts one by one)."""
    from sdsengine.models import skeleton
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = SparseGPTConfig(sparsity="2:4", ignore=["model.layers.0.self_attn.q_proj"])
    plan = sdsengine.plan(model, config, tiny_tokens(nsamples=3))
    planned = sdsengine.plan(skeleton(model.config), config, tiny_tokens(nsamples=3))
    assert planned.pop("host_available_bytes") > 0 and plan.pop("host_available_bytes") > 0  # read at each call
    assert plan == planned
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    result = sdsengine.prune(model, config, tiny_tokens(nsamples=3), progress=False)
    assert plan["linears_pruned"] == sum(len(layer.linears) for layer in result.layers)
    assert plan["linears_kept_dense"] == 1 and plan["layers"] == len(result.layers)
    assert plan["weights_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert plan["before_layers_bytes"] == model.get_input_embeddings().weight.numel() * 4  # what the capture reads
