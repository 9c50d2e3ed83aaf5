"""Mixtures of experts: fused expert banks pruned as per-expert linears (pipeline/experts.py)."""
import gc
import json
import warnings
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sdsengine
from sdsengine import mixture_save, tensorfiles, transformers_compat
from sdsengine.algorithms import magnitude, wanda
from sdsengine.algorithms.stats import InputNorms
from sdsengine.checkpoint import save_checkpoint
from sdsengine.config import BESAConfig, MagnitudeConfig, SDSConfig, SparseGPTConfig, WandaConfig
from sdsengine.masks import nm_violations
from sdsengine.pipeline import adapters, experts, sequential
from sdsengine.pipeline.capture import capture_layer_inputs
from sdsengine.pipeline.sequential import linear_groups, run_layer
from tiny_models import (MOE_SETTINGS, layer_outputs, mixture_or_skip, needs_fused_experts, tiny_config, tiny_model,
                         tiny_tokens)

MOE = [family for family in MOE_SETTINGS if family in adapters.MOE_FAMILIES]
pytestmark = needs_fused_experts


def _state(model):
    return {name: (t.clone(), t.requires_grad) for name, t in model.state_dict(keep_vars=True).items()}


def _slices(model):
    """Every expert's weight in every fused bank, as (out, in), by 'bank name[expert]'."""
    out = {}
    for name, bank in model.named_parameters():
        if bank.dim() == 3:
            owner = model.get_submodule(name.rpartition(".")[0])
            for e, w in enumerate(bank.detach()):
                out[f"{name}[{e}]"] = w.T if owner.is_transposed else w
    return out


def test_every_supported_mixture_is_in_the_tests():
    assert sorted(MOE) == sorted(adapters.MOE_FAMILIES)


@pytest.mark.parametrize("family", MOE)
def test_unfused_experts_compute_what_the_fused_ones_do_and_go_back_unchanged(family):
    model = mixture_or_skip(family)
    for bank in (p for p in model.parameters() if p.dim() == 3):
        torch.nn.init.normal_(bank, std=0.05)  # weights that matter (some families start experts at zero)
    ids, before = tiny_tokens(2, 12), _state(model)
    fused = sum(experts.is_fused_experts(m) for m in model.modules())
    with torch.no_grad():
        expected = model(ids).logits
        with experts.unfused(adapters.decoder_layers(model)) as swapped:
            assert swapped == fused > 0
            assert not any(p.dim() == 3 for p in model.parameters())
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # the experts' sums in another order
    after = _state(model)
    assert after.keys() == before.keys()
    for name, (tensor, grad) in before.items():
        assert torch.equal(after[name][0], tensor) and after[name][1] == grad, name


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_replayed_layers_match_plain_forward(family):
    """Capture and layer-by-layer replay, with the experts unfused, reproduce a plain forward of the fused model."""
    model, samples = tiny_model(family), tiny_tokens(3, 16)
    expected = layer_outputs(model, samples)[-1]
    with experts.unfused(adapters.decoder_layers(model)):
        inps, kwargs = capture_layer_inputs(model, samples, torch.device("cpu"), torch.device("cpu"))
        outs = torch.empty_like(inps)
        for layer, layer_kwargs in zip(adapters.decoder_layers(model), kwargs):
            run_layer(layer, inps, outs, layer_kwargs, "cpu")
            inps, outs = outs, inps
    torch.testing.assert_close(inps, expected, atol=1e-5, rtol=1e-5)


def test_a_failure_inside_puts_every_bank_back_with_what_was_pruned():
    model = tiny_model("mixtral")
    with pytest.raises(KeyboardInterrupt):
        with experts.unfused(adapters.decoder_layers(model)):
            model.model.layers[0].mlp.experts.get_submodule("1").down_proj.weight.data.zero_()
            raise KeyboardInterrupt
    banks = model.model.layers[0].mlp.experts
    assert experts.is_fused_experts(banks) and banks.down_proj.shape == (4, 64, 128)
    assert banks.down_proj[1].abs().sum() == 0 and banks.down_proj[0].abs().sum() > 0


def test_a_mixture_pruned_where_it_sits_is_pruned_in_its_banks_memory():
    """On the device its banks sit on, the experts' linears view the banks: the prune writes into them, and no expert
    is copied nor any bank stacked anew (a loaded mixture's experts, most of its weights, were held twice over)."""
    model = tiny_model("mixtral")
    banks = {name: (p, p.data_ptr()) for name, p in model.named_parameters() if p.dim() == 3}
    sdsengine.prune(model, WandaConfig(sparsity="2:4"), tiny_tokens(2, 8), progress=False)
    assert banks and all(dict(model.named_parameters())[name] is p and p.data_ptr() == ptr
                         for name, (p, ptr) in banks.items())
    assert all(nm_violations(w, 2, 4) == 0 and (w == 0).float().mean() == 0.5 for w in _slices(model).values())


def test_linears_given_other_tensors_inside_are_stacked_back():
    """A layer moved to a compute device and back holds copies, no longer views of its banks: those go back stacked."""
    model = tiny_model("mixtral")
    with experts.unfused(adapters.decoder_layers(model), "cpu"):
        linear = model.model.layers[1].mlp.experts.get_submodule("2").down_proj
        assert linear.weight.data_ptr() == model.model.layers[1].mlp.experts.fused.down_proj[2].data_ptr()
        linear.weight.data = torch.zeros_like(linear.weight)  # a copy, as a move makes one
    bank = model.model.layers[1].mlp.experts.down_proj
    assert bank[2].abs().sum() == 0 and bank[1].abs().sum() > 0


def test_leaving_lets_each_layers_linears_go_once_its_banks_are_rebuilt(monkeypatch):
    """A model's experts are most of its weights: the linears of layers already fused back must not stay alive
    while the next layers' banks are rebuilt (all of them were, to the end: twice the experts' memory)."""
    model = tiny_model("mixtral")
    done, alive = [], []
    real = experts.UnfusedExperts.fuse_back

    def fuse_back(self):
        gc.collect()
        alive.append(sum(ref() is not None for ref in done))
        real(self)
        done.append(weakref.ref(self))
    monkeypatch.setattr(experts.UnfusedExperts, "fuse_back", fuse_back)
    with experts.unfused(adapters.decoder_layers(model)):
        pass
    assert alive == [0, 0]


def test_a_mixture_pruned_under_inference_mode_can_still_be_trained():
    """Pruned under torch.inference_mode(), a dense model's weights (changed in place) stay ordinary tensors; the
    rebuilt expert banks were inference tensors, and the next training step failed on them."""
    model = tiny_model("mixtral")
    with torch.inference_mode():
        sdsengine.prune(model, WandaConfig(sparsity="2:4"), tiny_tokens(2, 8), progress=False)
    assert not [name for name, p in model.named_parameters() if p.is_inference()]
    ids = tiny_tokens(1, 8)
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.experts.down_proj.grad is not None


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_the_banks_are_the_same_parameters_after_a_prune(family):
    """As a dense model's weights are pruned in place: an optimizer built before the prune holds the pruned banks
    (new Parameters in their place left it training the unpruned ones, which the model no longer holds)."""
    model = tiny_model(family)
    before = {name: p for name, p in model.named_parameters() if p.dim() == 3}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sdsengine.prune(model, WandaConfig(sparsity="2:4"), tiny_tokens(2, 8), progress=False)
    after = {name: p for name, p in model.named_parameters() if p.dim() == 3}
    assert after.keys() == before.keys() and all(after[name] is p for name, p in before.items())
    assert all(nm_violations(w, 2, 4) == 0 for w in _slices(model).values())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in after.values())


@pytest.mark.parametrize("family", MOE)
def test_mixtures_prune_save_reload_and_convert(family, tmp_path):
    """SparseGPT 2:4 on every expert of every layer (each slice 2:4 along its inputs), routers untouched; the
    checkpoint has the model's own fused layout and reloads with transformers computing what the pruned model did;
    the converted model too."""
    model = mixture_or_skip(family)
    routers = {n: p.clone() for n, p in model.named_parameters()
               if any(f".{r}." in n for r in experts.ROUTERS) and "experts" not in n}
    assert routers or family in ("granitemoe",)
    result = sdsengine.prune(model, SparseGPTConfig(sparsity="2:4", blocksize=16), tiny_tokens(), progress=False)
    slices = _slices(model)
    assert slices and all(nm_violations(w, 2, 4) == 0 and (w == 0).float().mean() == 0.5 for w in slices.values())
    assert all(torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)
    n_experts = model.config.to_dict().get("num_local_experts") or model.config.to_dict().get("num_experts") or 4
    per_layer = [sum(".experts." in name for name in r.linears) for r in result.layers]
    assert per_layer[-1] == 2 * n_experts and result.report["overall_sparsity"] == 0.5
    assert result.report["decoder_sparsity"] == 0.5  # routers, never pruned, are not counted (as linears or not)
    assert all(r.error > 0 for r in result.layers)
    ids = tiny_tokens(2, 8, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    out = save_checkpoint(model, None, tmp_path / "pruned", result.report)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert _slices(reloaded).keys() == slices.keys()
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        # converted, experts included: they run one expert at a time, as transformers' eager loop does (the same
        # sums in the same order); the checkpoint's bfloat16 model was built in it, as the compressed one loads
        expected = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, experts_implementation="eager")(
            ids).logits
        converted = sdsengine.convert(AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16),
                                      pack_experts=True)
        assert _packed_experts(converted) == _packed_experts(converted, every=True) != []
        torch.testing.assert_close(converted(ids).logits, expected, rtol=0, atol=0)
        packed = sdsengine.load_compressed(sdsengine.save_compressed(converted, tmp_path / "packed"))
        assert _packed_experts(packed) == _packed_experts(converted)
        torch.testing.assert_close(packed(ids).logits, expected, rtol=0, atol=0)


# mixtures whose checkpoints hold their experts' banks fused (GPT-OSS, GraniteMoE, Llama 4): save_pretrained only
# renames them, without a copy
_STORED_FUSED = {"gpt_oss", "granitemoe", "llama4_text"}


@pytest.mark.parametrize("family", MOE)
def test_a_pruned_mixture_is_saved_as_save_pretrained_saves_it_each_expert_from_a_view(family, tmp_path):
    """save_checkpoint writes the tensors (names, dtypes, values) and config save_pretrained writes; where the
    checkpoint stores the experts one by one, each expert's tensor is written from a view of its rows of the bank, not from
    transformers' reversal, which copies every gate_up bank (tests/test_memory.py)."""
    model = mixture_or_skip(family)
    sdsengine.prune(model, MagnitudeConfig(sparsity="2:4"), progress=False)
    assert (mixture_save.checkpoint_entries(model) is None) == (family in _STORED_FUSED)
    model.save_pretrained(tmp_path / "transformers")
    out = save_checkpoint(model, None, tmp_path / "ours", {})
    ours, theirs = (load_file(d / "model.safetensors") for d in (out, tmp_path / "transformers"))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert (out / "config.json").read_text() == (tmp_path / "transformers" / "config.json").read_text()


def test_a_mixture_larger_than_a_shard_is_saved_in_shards_with_an_index(tmp_path):
    model = mixture_or_skip("qwen3_moe")
    sdsengine.prune(model, MagnitudeConfig(sparsity="2:4"), progress=False)
    entries = mixture_save.checkpoint_entries(model)
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    mixture_save.write_shards(tmp_path, entries, shard_bytes=largest)
    index = json.loads((tmp_path / tensorfiles.INDEX).read_text())
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert all(sum(t.numel() * t.element_size() for t in load_file(f).values()) <= largest for f in files)
    assert index["weight_map"].keys() == {name for name, *_ in entries}
    model.config.save_pretrained(tmp_path)
    ids = tiny_tokens(2, 8, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits,
                                   rtol=0, atol=0)


def test_a_mixture_whose_experts_transformers_would_save_elsewhere_is_saved_by_transformers(tmp_path, monkeypatch):
    """Where the views do not give every tensor transformers' reversal gives, it is said, and save_pretrained saves the
    model (copying its banks, as before)."""
    model = mixture_or_skip("qwen3_moe")
    split = transformers_compat.rows_split
    monkeypatch.setattr(transformers_compat, "rows_split", lambda *a: dict(list(split(*a).items())[1:]))
    with pytest.warns(UserWarning, match="saved by save_pretrained"):
        out = save_checkpoint(model, None, tmp_path / "out", {})
    ids = tiny_tokens(2, 8, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, model(ids).logits,
                                   rtol=0, atol=0)


def test_a_failure_laying_out_the_experts_leaves_the_save_to_transformers(tmp_path, monkeypatch):
    """Another transformers' internals (a reversal that cannot run on meta tensors, say) must not lose a finished
    run."""
    model = mixture_or_skip("qwen3_moe")

    def broken(*args):
        raise NotImplementedError("meta tensors")

    monkeypatch.setattr(transformers_compat, "reverted", broken)
    with pytest.warns(UserWarning, match=r"could not be laid out .*NotImplementedError: meta tensors"):
        assert mixture_save.checkpoint_entries(model) is None


def test_an_offloaded_mixture_is_saved_by_transformers():
    """An offloaded module's parameters are on the meta device, their values in accelerate's hooks."""
    model = mixture_or_skip("qwen3_moe")
    assert mixture_save.checkpoint_entries(model) is not None
    model.model.layers[1].self_attn.q_proj.to("meta")
    assert mixture_save.checkpoint_entries(model) is None


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_besa_learns_a_mixtures_experts_within_each_block(family, pattern):
    """BESA on a mixture: each expert's linears are learned in their decoder layer's block like the attention's;
    every block's counted sparsity is the target (2:4: every expert slice holds it), routers stay as they were, and
    the first layer's error, on the same inputs as Wanda's, is no higher (the layer guard)."""
    model, baseline = mixture_or_skip(family), tiny_model(family)
    routers = {n: p.clone() for n, p in model.named_parameters()
               if any(f".{r}." in n for r in experts.ROUTERS) and "experts" not in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experts that saw few tokens: test_each_experts_token_count_is_reported...
        result = sdsengine.prune(model, BESAConfig(sparsity=pattern), tiny_tokens(), progress=False)
        wanda_result = sdsengine.prune(baseline, WandaConfig(sparsity=pattern), tiny_tokens(), progress=False)
    assert any(".experts." in name for layer in result.layers for name in layer.linears)  # (DeepSeek's first: dense)
    for layer in result.layers:
        sizes = {name: info["shape"][0] * info["shape"][1] for name, info in layer.linears.items()}
        zeros = sum(info["sparsity"] * sizes[name] for name, info in layer.linears.items())
        assert abs(zeros / sum(sizes.values()) - 0.5) <= 1e-3, layer.index
    if pattern == "2:4":
        assert all(nm_violations(w, 2, 4) == 0 for w in _slices(model).values())
    assert all(torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)
    assert result.layers[0].error <= wanda_result.layers[0].error * (1 + 1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(tiny_tokens(1, 8)).logits).all()


def _packed_experts(model, every=False):
    """Names of the experts modules whose every linear is a SparseLinear (every: of all the experts modules)."""
    from sdsengine.nn.sparse_linear import SparseLinear
    return [name for name, m in model.named_modules() if isinstance(m, experts.UnfusedExperts) and (
        every or all(isinstance(sub, SparseLinear) for e in m.experts() for sub in e.children()))]


def _routed_inputs(model, samples, index):
    """Per expert of layer `index`: its routed tokens' inputs, window by window, from the unpruned fused model."""
    moe = model.model.layers[index].mlp
    seen = {e: [] for e in range(moe.experts.num_experts)}

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        _, _, chosen = module.gate(x)
        for e in seen:
            seen[e].append(x[(chosen == e).any(dim=-1)])
    handle = moe.register_forward_pre_hook(hook)
    with torch.no_grad():
        for j in range(samples.shape[0]):
            model(samples[j:j + 1])
    handle.remove()
    return seen


def test_each_expert_is_pruned_on_the_tokens_routed_to_it():
    """Wanda's norms for an expert's gate_up_proj come from the tokens its router sent it, not all tokens."""
    model, samples, config = tiny_model("mixtral"), tiny_tokens(4, 32), WandaConfig(sparsity="2:4")
    dense = {e: w.clone() for e, w in enumerate(model.model.layers[0].mlp.experts.gate_up_proj.detach())}
    routed = _routed_inputs(model, samples, 0)
    assert len({sum(len(x) for x in xs) for xs in routed.values()}) > 1  # experts saw different token counts
    sdsengine.prune(model, config, samples, progress=False)
    for e, windows in routed.items():
        norms = InputNorms(64, "cpu")
        for x in windows:
            if len(x):
                norms.add_batch(x)
        expected = wanda.prune(dense[e], norms, config)
        assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[e], expected), e


@pytest.mark.parametrize("config", [SparseGPTConfig(sparsity="2:4", blocksize=16), WandaConfig(sparsity="0.5")])
def test_an_expert_no_calibration_token_reached_is_pruned_by_magnitude_and_says_so(config, monkeypatch):
    """SparseGPT's statistics of no token take every input for dead and zeroed the whole expert; Wanda's scores all
    tied. Magnitude is what is left to go by, and the layer's steps say so."""
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate
    real = router.forward

    def never_expert_3(hidden):
        logits, weights, chosen = real(hidden)
        return logits, weights, torch.where(chosen == 3, 0, chosen)
    monkeypatch.setattr(router, "forward", never_expert_3)
    dense = model.model.layers[0].mlp.experts.down_proj[3].detach().clone()
    result = sdsengine.prune(model, config, tiny_tokens(), progress=False)
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[3], magnitude.prune(dense, None, config))
    assert result.layers[0].steps["mlp.experts.3.down_proj"] == {"calibration_tokens": 0, "pruned_by": "magnitude"}
    assert "mlp.experts.3.down_proj" not in result.layers[1].steps  # reached there: the method's own


def test_true_sequential_takes_one_pass_per_projection_of_the_experts():
    model = tiny_model("mixtral")
    with experts.unfused(adapters.decoder_layers(model)):
        layer = model.model.layers[0]
        inps, kwargs = capture_layer_inputs(model, tiny_tokens(1, 8), torch.device("cpu"), torch.device("cpu"))
        groups = linear_groups(layer, adapters.pruned_linears(layer), inps, kwargs[0], "cpu")
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        [f"mlp.experts.{e}.gate_up_proj" for e in range(4)], [f"mlp.experts.{e}.down_proj" for e in range(4)]]
    result = sdsengine.prune(model, SparseGPTConfig(sparsity="2:4", blocksize=16, sequential="linear"),
                             tiny_tokens(), progress=False)
    assert result.report["overall_sparsity"] == 0.5
    assert all(nm_violations(w, 2, 4) == 0 for w in _slices(model).values())


def test_true_sequential_puts_experts_the_first_window_missed_in_their_projections_pass():
    """linear_groups records the first window only: an expert it did not reach had its gate_up_proj and down_proj in
    one last group, the down_proj pruned on inputs that its pruned gate_up_proj never shaped."""
    config = tiny_config("mixtral")
    config.num_local_experts = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with experts.unfused(adapters.decoder_layers(model)):
        layer = model.model.layers[0]
        inps, kwargs = capture_layer_inputs(model, tiny_tokens(1, 4), torch.device("cpu"), torch.device("cpu"))
        routed = set()
        hooks = [layer.mlp.experts.get_submodule(f"{e}.down_proj").register_forward_hook(
            lambda *_, e=e: routed.add(e)) for e in range(16)]
        groups = linear_groups(layer, adapters.pruned_linears(layer), inps[:1], kwargs[0], "cpu")
        for hook in hooks:
            hook.remove()
    assert 0 < len(routed) < 16  # 4 tokens, 2 experts each: most experts unreached in this window
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        sorted(f"mlp.experts.{e}.gate_up_proj" for e in range(16)), sorted(f"mlp.experts.{e}.down_proj" for e in range(16))]


def test_experts_whose_inputs_the_pattern_does_not_divide_are_refused_with_the_ignore_for_all_of_them():
    """Every expert has the shape of the first: the refusal names the --ignore pattern that covers all of them, which
    then prunes the rest (one expert's name moved the refusal on to the next)."""
    config = tiny_config("qwen2_moe")
    config.moe_intermediate_size = 30
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"layer 0 mlp\.experts\.0\.down_proj: in_features 30 is not divisible by M=4 "
                                         r".*--ignore \(every expert's: --ignore 'model\.layers\.\*\.mlp\.experts\.\*\.down_proj'\)"):
        sdsengine.prune(model, WandaConfig(sparsity="2:4"), tiny_tokens(2, 8), progress=False)
    result = sdsengine.prune(model, WandaConfig(sparsity="2:4", ignore=("model.layers.*.mlp.experts.*.down_proj",)),
                             tiny_tokens(2, 8), progress=False)
    assert result.report["overall_sparsity"] == 0.5


def test_ignore_names_experts_and_routers_are_never_pruned():
    """--ignore takes an expert by its index; a router that is an nn.Linear (PhiMoE's) stays dense unasked, and
    counts as a dense linear of the decoder."""
    model = tiny_model("phimoe")
    router = model.model.layers[0].mlp.router.weight.clone()
    expert0 = model.model.layers[1].mlp.experts.gate_up_proj[0].detach().clone()
    result = sdsengine.prune(model, MagnitudeConfig(sparsity="2:4", ignore=("model.layers.1.mlp.experts.0",)),
                             progress=False)
    assert torch.equal(model.model.layers[0].mlp.router.weight, router)
    assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj[0], expert0)
    assert "mlp.router" not in result.layers[0].linears and "mlp.experts.0.gate_up_proj" not in result.layers[1].linears
    assert result.report["overall_sparsity"] == 0.5 and result.report["decoder_sparsity"] < 0.5


def test_a_stopped_run_on_a_mixture_resumes_to_the_unbroken_result(tmp_path, monkeypatch):
    # enough tokens that most experts' linears are re-fit (SDS leaves those with fewer tokens than inputs alone)
    config, samples = SDSConfig(sparsity="2:4", base="wanda", iters=3, refit=2, teacher="dense"), tiny_tokens(4, 64)
    unbroken = tiny_model("qwen2_moe")
    sdsengine.prune(unbroken, config, samples, progress=False)

    class Stop(BaseException):
        pass
    real = sequential._prune_layer

    def stop_at_1(i, *args, **kwargs):
        if i == 1:
            raise Stop
        return real(i, *args, **kwargs)
    stopped = tiny_model("qwen2_moe")
    with monkeypatch.context() as m:
        m.setattr(sequential, "_prune_layer", stop_at_1)
        with pytest.raises(Stop):
            sdsengine.prune(stopped, config, samples, progress=False, resume_dir=tmp_path / "progress")
    assert experts.is_fused_experts(stopped.model.layers[0].mlp.experts)  # put back on the way out
    resumed = tiny_model("qwen2_moe")
    result = sdsengine.prune(resumed, config, samples, progress=False, resume_dir=tmp_path / "progress")
    assert result.report["resumed"]["from_layer"] == 1
    want = unbroken.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, want[name]), name


def test_a_mixture_outside_the_supported_ones_is_refused_naming_its_experts():
    with pytest.raises(ValueError, match=r"unsupported model layout 'llama4_text' \(a mixture-of-experts model whose "
                                         r"experts' weights, fused 3-D parameters such as "
                                         r"model\.layers\.0\.feed_forward\.experts\.gate_up_proj"):
        sdsengine.prune(tiny_model("llama4_text"), MagnitudeConfig(sparsity="2:4"), progress=False)


def test_the_cli_prunes_and_converts_a_mixture_its_experts_when_asked(tmp_path, capsys):
    """prune loads a saved mixture (no refusal from its config), writes it in its own fused layout; convert packs
    its attention, and its experts with --pack-experts."""
    from sdsengine.cli import main
    from tiny_models import save_tiny_tokenizer
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    assert main(["prune", "--model", str(tmp_path / "model"), "--method", "magnitude", "--sparsity", "2:4",
                 "--out", str(tmp_path / "pruned")]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert all(nm_violations(w, 2, 4) == 0 and (w == 0).float().mean() == 0.5 for w in _slices(pruned).values())
    capsys.readouterr()
    assert main(["convert", "--model", str(tmp_path / "pruned"), "--out", str(tmp_path / "attention")]) == 0
    out = capsys.readouterr().out
    assert "8 of 9 linears converted" in out  # by default the experts stay fused: the routers are no linears here
    assert "experts' fused weights, 84% of the model's, stay dense in it (--pack-experts packs them" in out
    assert main(["convert", "--model", str(tmp_path / "pruned"), "--out", str(tmp_path / "packed"),
                 "--pack-experts"]) == 0
    out = capsys.readouterr().out
    # attention's 8 and the experts' 16 (2 layers x 4 experts x 2); the routers are no linears here, lm_head stays
    assert "24 of 25 linears converted" in out and "stay dense" not in out
    packed = sdsengine.load_compressed(tmp_path / "packed")
    assert len(_packed_experts(packed)) == 2
    ids = tiny_tokens(1, 8)
    with torch.no_grad():
        # loaded in bfloat16 as convert made it (.to() would cast the rotary frequencies too), its experts run as
        # the converted ones are
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.bfloat16,
                                                        experts_implementation="eager")(ids).logits
        torch.testing.assert_close(packed(ids).logits, expected, rtol=0, atol=0)
    capsys.readouterr()
    assert main(["convert", "--model", str(tmp_path / "pruned"), "--out", str(tmp_path / "ignored"),
                 "--pack-experts", "--ignore", "*experts*"]) == 0
    out = capsys.readouterr().out
    assert "8 of 25 linears converted" in out and "84% of the model's, stay dense in it (none of their linears" in out


def test_paired_lines_up_the_dense_streams_tokens_with_this_streams():
    x = torch.ones(3, 2)  # this stream sent tokens 2, 5 and 7 here; the dense one 5, 1 and 2
    dense = torch.tensor([[50., 50.], [10., 10.], [20., 20.]])
    got = experts.paired(x, torch.tensor([2, 5, 7]), dense, torch.tensor([5, 1, 2]))
    assert torch.equal(got, torch.tensor([[20., 20.], [50., 50.], [0., 0.]]))
    assert torch.equal(experts.paired(x, torch.tensor([2, 5, 7]), None, None), torch.zeros(3, 2))


def test_a_mixture_under_transformers_4_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    """transformers 4 keeps experts as linears beside a linear router (which would be pruned) and does not say which
    tokens an expert got: refused by name, from the config."""
    import transformers

    from sdsengine.models import load_model
    from tiny_models import save_tiny_tokenizer
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "model")
    save_tiny_tokenizer(tmp_path / "model")
    monkeypatch.setattr(transformers_compat, "major", lambda: 4)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"mixtures of experts \(qwen2_moe\) are pruned with transformers 5 or later"):
        load_model(str(tmp_path / "model"))


def test_experts_without_the_has_gate_flag_are_gated_ones():
    """transformers before has_gate (5.0 to 5.2) sets only is_transposed and has_bias: its experts were
    all gated, gate and up in gate_up_proj. Found none there, sdsengine refused every mixture's layout."""
    model = tiny_model("mixtral")
    for bank in (p for p in model.parameters() if p.dim() == 3):
        torch.nn.init.normal_(bank, std=0.05)
    fused = [m for m in model.modules() if experts.is_fused_experts(m)]
    ids = tiny_tokens(2, 12)
    with torch.no_grad():
        expected = model(ids).logits  # transformers' own experts read the flag where it has one
        for module in fused:
            module.__dict__.pop("has_gate", None)
            assert not hasattr(module, "has_gate") and experts.is_fused_experts(module)
        with experts.unfused(adapters.decoder_layers(model)) as swapped:
            assert swapped == len(fused) > 0
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_routing_weights_for_every_expert_are_refused_naming_the_release():
    """transformers 5.0's PhiMoE and HunYuan-MoE routers hand the experts (tokens, experts) weights, which the
    experts read by top-k position: unfused experts computing that would be pruned for a wrong mixture."""
    fused = next(m for m in tiny_model("mixtral").modules() if experts.is_fused_experts(m))
    unfused = experts.UnfusedExperts(fused)
    x, index = torch.randn(5, 64), torch.tensor([[0, 1]] * 5)
    unfused(x, index, torch.full((5, 2), 0.5))  # one weight per chosen expert: fine
    with pytest.raises(ValueError, match="4 routing weights per token for 2 chosen experts.*newer transformers"):
        unfused(x, index, torch.full((5, 4), 0.25))


def test_experts_outputs_are_summed_in_expert_order_without_a_repeated_index(monkeypatch):
    """One index_add_ over every routed row repeats each token (once per expert): CUDA adds repeated rows
    atomically, in no fixed order, so the sums changed from run to run there. The sums are the eager loop's, one
    index_add_ per expert, bit for bit (bfloat16: every add rounds)."""
    model = tiny_model("mixtral")
    model.set_experts_implementation("eager")
    fused = next(m for m in model.modules() if experts.is_fused_experts(m)).to(torch.bfloat16)
    for bank in (p for p in fused.parameters() if p.dim() == 3):
        torch.nn.init.normal_(bank, std=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 64, generator=g).to(torch.bfloat16)
    index = torch.stack([torch.randperm(fused.gate_up_proj.shape[0], generator=g)[:2] for _ in range(30)])
    weights = torch.rand(30, 2, generator=g)
    with torch.no_grad():
        expected = fused(x, index, weights)  # transformers' eager loop: one index_add_ per expert
        unfused = experts.UnfusedExperts(fused)
        add = torch.Tensor.index_add_

        def unique_only(self, dim, idx, source, **kwargs):
            assert idx.unique().numel() == idx.numel(), "index_add_ over a repeated index"
            return add(self, dim, idx, source, **kwargs)

        monkeypatch.setattr(torch.Tensor, "index_add_", unique_only)
        got = unfused(x, index, weights)
    assert torch.equal(got, expected)


def test_routing_by_one_sort_picks_what_asking_each_expert_picks():
    g = torch.Generator().manual_seed(0)
    chosen = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(40)])  # 40 tokens, 2 of 6 experts
    chosen[3, 1] = 5 + 1  # expert parallelism's sentinel: nobody's
    token, position, counts = experts._routed(chosen, 5)
    assert len(counts) == 5 and sum(counts) == int((chosen < 5).sum())  # experts 5 and the sentinel: nobody's
    for e, (mine, where) in enumerate(zip(token.split(counts), position.split(counts))):
        want = torch.where(chosen == e)
        assert torch.equal(mine, want[0]) and torch.equal(where, want[1]), e


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("config", [SparseGPTConfig(sparsity="2:4", blocksize=16, device="cuda"),
                                    WandaConfig(sparsity="0.5", device="cuda")], ids=["sparsegpt 2:4", "wanda 50%"])
def test_mixtures_prune_on_the_gpu_as_on_the_cpu(family, config):
    """Each layer's experts on the GPU (the Triton kernels, the one-sort routing) and back home after: every slice
    holds the pattern and the layers' errors are close to the CPU run's (masks from other kernels: close, not
    equal)."""
    import dataclasses
    on_gpu, on_cpu = tiny_model(family), tiny_model(family)
    result = sdsengine.prune(on_gpu, config, tiny_tokens(), progress=False)
    expected = sdsengine.prune(on_cpu, dataclasses.replace(config, device="cpu"), tiny_tokens(), progress=False)
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    for name, w in _slices(on_gpu).items():
        ok = nm_violations(w, 2, 4) == 0 if config.sparsity.nm else abs((w == 0).float().mean() - 0.5) < 0.02
        assert ok, name
    assert [r.error for r in result.layers] == pytest.approx([r.error for r in expected.layers], rel=0.1)


@pytest.mark.gpu
def test_a_mixture_on_the_gpu_stays_there_and_saves_as_transformers_saves_it(tmp_path):
    model = tiny_model("qwen2_moe").to("cuda")
    sdsengine.prune(model, SparseGPTConfig(sparsity="2:4", blocksize=16, device="cuda"), tiny_tokens(), progress=False)
    moved = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
    assert not moved and all(nm_violations(w, 2, 4) == 0 for w in _slices(model).values()), moved
    model.save_pretrained(tmp_path / "transformers")
    ours, theirs = (load_file(d / "model.safetensors") for d in (save_checkpoint(model, None, tmp_path / "ours", {}),
                                                                  tmp_path / "transformers"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_each_experts_token_count_is_reported_and_too_few_are_warned_of():
    """A router sends some experts few tokens: fewer than the linear's inputs leave its statistics rank-deficient,
    which the run names (on tiny models SDS shrank such experts to a fifth of their size)."""
    model = tiny_model("mixtral")
    with pytest.warns(UserWarning, match=r"expert linear\(s\) saw fewer calibration tokens than they have inputs, "
                                         r"as few as \d+ \(layer \d mlp\.experts\.\d\.(gate_up|down)_proj\)"):
        result = sdsengine.prune(model, WandaConfig(sparsity="2:4"), tiny_tokens(1, 16), progress=False)
    counts = {name: info["calibration_tokens"] for name, info in result.layers[0].linears.items()
              if ".experts." in name}
    assert len(counts) == 8 and sum(counts.values()) == 2 * 2 * 16  # 16 tokens, 2 experts each, 2 projections
    assert "calibration_tokens" not in result.layers[0].linears["self_attn.q_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough tokens: no warning
        sdsengine.prune(tiny_model("mixtral"), WandaConfig(sparsity="2:4"), tiny_tokens(16, 64), progress=False)


def test_an_ignore_in_the_checkpoints_fused_names_is_refused_with_an_experts_name():
    """The checkpoint shows fused banks (mlp.experts.gate_up_proj), which name no linear that is pruned: the refusal
    gave only an attention name, with nothing to say how an expert is named."""
    with pytest.raises(ValueError, match=r"names look like 'model\.layers\.0\.self_attn\.q_proj' and, for an expert, "
                                         r"'model\.layers\.0\.mlp\.experts\.0\.gate_up_proj'"):
        sdsengine.prune(tiny_model("mixtral"), MagnitudeConfig(sparsity="2:4",
                                                               ignore=("model.layers.*.mlp.experts.gate_up_proj",)),
                        progress=False)


def test_a_module_that_cannot_be_fused_back_does_not_keep_the_others_from_going_back(monkeypatch):
    """Out of memory while stacking one layer's banks: the later layers went back unfused too."""
    model = tiny_model("mixtral")
    real = experts.UnfusedExperts.fuse_back
    calls = []

    def first_fails(self):
        calls.append(self)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("stacking the banks")
        real(self)
    monkeypatch.setattr(experts.UnfusedExperts, "fuse_back", first_fails)
    with pytest.raises(torch.OutOfMemoryError, match="stacking the banks"):
        with experts.unfused(adapters.decoder_layers(model)):
            pass
    assert len(calls) == 2 and experts.is_fused_experts(model.model.layers[1].mlp.experts)
    assert model.model.layers[1].mlp.experts.down_proj.shape == (4, 64, 128)


def test_an_expert_chosen_twice_by_a_token_adds_both_choices():
    """No topk router picks an expert twice, but a custom one may: each choice is added (they once shared a slot,
    one lost without a word)."""
    model = tiny_model("mixtral")
    fused = next(m for m in model.modules() if experts.is_fused_experts(m))
    for bank in (p for p in fused.parameters() if p.dim() == 3):
        torch.nn.init.normal_(bank, std=0.05)
    unfused = experts.UnfusedExperts(fused)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    twice = torch.tensor([[2, 2], [1, 3], [0, 0]])
    weights = torch.tensor([[0.25, 0.5], [0.5, 0.5], [0.75, 0.125]])
    with torch.no_grad():
        once = unfused(x, twice[:, :1], torch.ones(3, 1))  # each token's first expert alone, weight 1
        other = unfused(x, twice[:, 1:], torch.ones(3, 1))
        got = unfused(x, twice, weights)
    torch.testing.assert_close(got, weights[:, :1] * once + weights[:, 1:] * other)
