"""A converted mixture of experts: its experts' 2:4 linears compressed like any other when asked (pack_experts),
saved and loaded; by default its fused experts stay as they are."""
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine import ops, transformers_compat
from sdsengine.config import MagnitudeConfig
from sdsengine.nn import sparse_linear
from sdsengine.nn.sparse_linear import SparseLinear, use_backend
from sdsengine.pipeline import experts
from tiny_models import tiny_model, tiny_tokens

pytestmark = pytest.mark.skipif(transformers_compat.major() < 5, reason="fused experts came with transformers 5")


def _pruned(family="mixtral", dtype=torch.bfloat16):
    """A tiny mixture pruned 2:4, in dtype, and the dense run of its experts that a converted one computes:
    transformers' eager loop, one expert at a time (the same sums in the same order)."""
    model = tiny_model(family)
    sdsengine.prune(model, MagnitudeConfig(sparsity="2:4"), tiny_tokens(), progress=False)
    model = transformers_compat.cast(model, dtype)
    model.set_experts_implementation("eager")
    return model


def _logits(model, ids=None):
    with torch.no_grad():
        return model(tiny_tokens(2, 8, seed=1) if ids is None else ids).logits


def _unfused(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, experts.UnfusedExperts)}


def _expert_linears(module):
    return {f"{e}.{name}": linear for e, expert in enumerate(module.experts())
            for name, linear in expert.named_children()}


def test_a_converted_mixtures_experts_run_compressed_and_its_banks_are_freed():
    model = _pruned()
    expected = _logits(model)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sdsengine.convert(model, pack_experts=True)
    unfused = _unfused(model)
    assert list(unfused) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for module in unfused.values():
        assert all(isinstance(m, SparseLinear) for m in _expert_linears(module).values())
        assert all(getattr(module.fused, bank).numel() == 0 for bank in ("gate_up_proj", "down_proj"))
    assert not any(p.dim() == 3 for p in model.parameters())
    held = sparse_linear.weight_bytes(model)
    assert held["compressed"] + sum(p.numel() * p.element_size() for p in model.parameters()) < 0.75 * dense_bytes
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


def test_generate_on_a_converted_mixture_gives_the_dense_tokens():
    model = _pruned()
    ids = tiny_tokens(1, 6, seed=2)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        assert torch.equal(sdsengine.convert(model, pack_experts=True).generate(ids, **kwargs), expected)


def test_by_default_convert_leaves_the_fused_experts_and_says_how_to_pack_them(caplog):
    """Packing the experts (less memory, speed unmeasured against transformers' fused run) is asked for."""
    model = _pruned()
    banks = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    expected = _logits(model)
    with caplog.at_level(logging.INFO, logger="sdsengine"):
        sdsengine.convert(model, report=(records := []))
    assert not _unfused(model) and {n: p for n, p in model.named_parameters() if p.dim() == 3} == banks
    assert [r.action for r in records].count("converted") == 8 and not any(".experts." in r.name for r in records)
    assert any("a mixture's fused experts, 84% of the model's weights (pack_experts=True packs them)" in r.getMessage()
               for r in caplog.records)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


def test_experts_none_of_whose_linears_converts_stay_fused(caplog):
    """An unpruned mixture, or one whose experts are ignored: the fused modules stay, with their very banks (the
    faster grouped run of transformers), and the log says what share of the model that is."""
    model = tiny_model("mixtral")
    banks = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    with pytest.warns(UserWarning, match="none of the 25 linear layers is converted"):
        sdsengine.convert(model, report=(records := []), pack_experts=True)
    assert not _unfused(model) and {n: p for n, p in model.named_parameters() if p.dim() == 3} == banks
    assert sum(".experts." in r.name for r in records) == 16

    model = _pruned()
    expected = _logits(model)
    with caplog.at_level(logging.INFO, logger="sdsengine"):
        sdsengine.convert(model, ignore=("lm_head", "*experts*"), pack_experts=True)
    seen = [r.getMessage() for r in caplog.records]
    assert not _unfused(model) and sum(p.dim() == 3 for p in model.parameters()) == 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdsengine"):  # again: its SparseLinears count as the weights they hold
        sdsengine.convert(model, ignore=("lm_head", "*experts*"), pack_experts=True)
    assert any("a mixture's fused experts, 84% of the model's weights" in r.getMessage() for r in caplog.records)
    assert any("kept dense: model.layers.0.mlp.experts.*.down_proj (64, 128): ignored (4 experts)" in m
               for m in seen), seen
    assert any("a mixture's fused experts, 84% of the model's weights" in m for m in seen)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


def test_experts_kept_dense_inside_a_converted_module_hold_their_own_weights(tmp_path):
    """One expert ignored: its linears stay nn.Linear, in copies of their own (the banks are freed), and save
    and load with the compressed ones."""
    model = _pruned()
    expected = _logits(model)
    sdsengine.convert(model, ignore=("lm_head", "*.experts.1.*"), pack_experts=True)
    for module in _unfused(model).values():
        linears = _expert_linears(module)
        assert {n for n, m in linears.items() if not isinstance(m, SparseLinear)} == {"1.gate_up_proj", "1.down_proj"}
        kept = linears["1.down_proj"].weight
        assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()  # not a view of a whole bank
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    loaded = sdsengine.load_compressed(sdsengine.save_compressed(model, tmp_path / "packed"))
    assert isinstance(loaded.model.layers[1].mlp.experts.get_submodule("1.down_proj"), torch.nn.Linear)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_a_converted_mixture_loads_into_a_skeleton_and_a_failed_load_leaves_it_as_it_was(tmp_path):
    model = _pruned()
    out = sdsengine.save_compressed(sdsengine.convert(model, pack_experts=True), tmp_path / "packed")
    skeleton = transformers_compat.cast(tiny_model("mixtral", seed=5), torch.bfloat16)
    loaded = sdsengine.load_compressed(out, model=skeleton)
    assert loaded is skeleton and len(_unfused(loaded)) == 2
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    again = sdsengine.load_compressed(out, model=loaded)  # into its own unfused experts: they take the file's
    assert again is loaded and len(_unfused(again)) == 2
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)

    other = tiny_model("mixtral", seed=6)  # a skeleton whose lm_head the file's does not fit
    other.lm_head = torch.nn.Linear(64, 95, bias=False)
    state = {n: t.clone() for n, t in other.state_dict().items()}
    fused = other.model.layers[0].mlp.experts
    with pytest.raises(ValueError, match="does not load"):
        sdsengine.load_compressed(out, model=other)
    assert other.model.layers[0].mlp.experts is fused and not _unfused(other)
    assert other.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[n]) for n, t in other.state_dict().items())


def test_a_manifest_naming_experts_wrongly_is_refused(tmp_path):
    out = sdsengine.save_compressed(sdsengine.convert(_pruned(), pack_experts=True), tmp_path / "packed")
    manifest = json.loads((out / "sdsengine_compressed.json").read_text())
    assert manifest["unfused_experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert manifest["version"] == 2  # a reader of version 1 cannot build them
    for version in (3, True):
        (out / "sdsengine_compressed.json").write_text(json.dumps(dict(manifest, version=version)))
        with pytest.raises(ValueError, match=rf"format version {version} is none this sdsengine reads \(1 and 2\): "
                                             r"a newer sdsengine wrote it"):
            sdsengine.load_compressed(out)
    manifest["unfused_experts"] = ["model.layers.0.self_attn"]
    (out / "sdsengine_compressed.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"holds model\.layers\.0\.self_attn as a mixture's experts, unfused; the "
                                         r"model has a MixtralAttention there"):
        sdsengine.load_compressed(out)
    manifest["unfused_experts"] = "model.layers.0.mlp.experts"
    (out / "sdsengine_compressed.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'unfused_experts' is damaged"):
        sdsengine.load_compressed(out)


@pytest.mark.parametrize("family", ["deepseek_v3", "hunyuan_v1_moe"])
def test_a_cast_keeps_what_transformers_keeps_in_float32(family, tmp_path):
    """DeepSeek-V3 lists its router's weight and score bias to stay float32; HunYuan builds its router's linear in
    float32; rotary frequencies are float32 too. A cast (convert's, of a float32 checkpoint) and a compressed load
    keep them so, as from_pretrained does: in bfloat16 the routing changed."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "dense")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    cast = transformers_compat.cast(tiny_model(family), torch.bfloat16)
    held = dict((*expected.named_parameters(), *expected.named_buffers()))
    for name, t in (*cast.named_parameters(), *cast.named_buffers()):
        assert t.dtype == held[name].dtype and torch.equal(t, held[name]), name
    # the router's weight (transformers 5.24) or its score bias, a buffer in 5.0: kept float32 beyond the rotary's
    assert any(t.dtype == torch.float32 and "rotary" not in n for n, t in held.items())
    assert transformers_compat.float32_names(cast, torch.float32) == set()


def test_a_model_that_cannot_be_built_on_the_meta_device_keeps_what_its_class_lists(monkeypatch):
    model = tiny_model("deepseek_v3")

    def refuse(*args, **kwargs):
        raise RuntimeError("no meta device here")

    monkeypatch.setattr(type(model), "_from_config", classmethod(refuse))
    names = transformers_compat.float32_names(model, torch.bfloat16)
    listed = type(model)._keep_in_fp32_modules_strict  # 5.0 lists the score bias alone, 5.24 the gate's weight too
    assert "e_score_correction_bias" in listed
    assert names == {f"model.layers.1.mlp.{n}" for n in ("gate.weight", "gate.e_score_correction_bias") if
                     n in listed or n.rpartition(".")[2] in listed}


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_a_converted_mixture_on_the_gpu_matches_its_dense_run(family, fresh_choices):
    """Each expert's linears through every backend there (the sparse kernels on a few routed tokens each)."""
    model = _pruned(family).cuda()
    ids = tiny_tokens(2, 8, seed=1).cuda()
    expected = _logits(model, ids).float()
    sdsengine.convert(model, pack_experts=True)
    torch.testing.assert_close(_logits(model, ids).float(), expected, rtol=2e-2, atol=2e-2)
    for backend in ops.available("cuda", torch.bfloat16):
        with use_backend(backend):
            try:
                forced = _logits(model, ids).float()
            except ops.BackendUnavailable:  # a library's shape limit (ours take every shape here)
                if backend in ("cusparselt", "cutlass"):
                    continue
                raise
        torch.testing.assert_close(forced, expected, rtol=2e-2, atol=2e-2, msg=lambda m, b=backend: f"{b}: {m}")


def test_a_convert_that_fails_on_an_expert_leaves_the_mixture_as_it_was(monkeypatch):
    model = _pruned()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    calls = []

    def from_dense(weight, bias=None):
        calls.append(weight.shape)
        if len(calls) == 12:  # inside the second layer's experts
            raise KeyboardInterrupt
        return real(weight, bias)

    real = SparseLinear.from_dense
    monkeypatch.setattr(SparseLinear, "from_dense", from_dense)
    with pytest.raises(KeyboardInterrupt):
        sdsengine.convert(model, pack_experts=True)
    assert not _unfused(model) and not any(isinstance(m, SparseLinear) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_sdsengine_bench_times_each_experts_shapes(family):
    """`sdsengine bench --model` on a mixture: its experts' projections are among the shapes (as converted: out, in;
    GPT-OSS stores its banks transposed)."""
    from sdsengine.bench import model_shapes
    shapes = model_shapes(tiny_model(family))
    assert "experts.gate_up_proj" in shapes[(256, 64)] and "experts.down_proj" in shapes[(64, 128)]
    ignored = model_shapes(tiny_model(family), ignore=("lm_head", "down_proj"))
    assert "experts.down_proj" not in ignored.get((64, 128), "")


def test_a_damaged_layout_leaves_the_skeleton_its_fused_banks(tmp_path):
    """A meta that is no 2:4 layout is found after the weights are assigned: the skeleton passed in gets its fused
    modules back with their very banks, not emptied ones (settle comes after the check)."""
    model = sdsengine.convert(_pruned(), pack_experts=True)
    model.model.layers[0].mlp.experts.get_submodule("0.down_proj").meta[1, 0] = 0x44444440  # column 0 kept twice
    out = sdsengine.save_compressed(model, tmp_path / "packed")
    skeleton = transformers_compat.cast(tiny_model("mixtral", seed=5), torch.bfloat16)
    fused = skeleton.model.layers[0].mlp.experts
    banks = {n: (p, p.detach().clone()) for n, p in skeleton.named_parameters() if p.dim() == 3}
    with pytest.raises(ValueError, match=r"packed, model\.layers\.0\.mlp\.experts\.0\.down_proj: meta is not a 2:4"):
        sdsengine.load_compressed(out, model=skeleton)
    assert skeleton.model.layers[0].mlp.experts is fused and not _unfused(skeleton)
    held = {n: p for n, p in skeleton.named_parameters() if p.dim() == 3}
    assert held.keys() == banks.keys()
    assert all(held[n] is p and torch.equal(p, value) for n, (p, value) in banks.items())


def test_packing_a_bare_experts_module_is_refused_naming_what_to_convert():
    model = _pruned()
    fused = model.model.layers[0].mlp.experts
    with pytest.raises(ValueError, match="convert packs a MixtralExperts inside the model that holds it"):
        sdsengine.convert(fused, pack_experts=True)
    sdsengine.convert(model.model.layers[0], pack_experts=True)  # its layer: fine
    assert isinstance(model.model.layers[0].mlp.experts, experts.UnfusedExperts)
