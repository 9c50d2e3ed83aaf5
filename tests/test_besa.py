"""BESA: gradients of the relaxation, exact block sparsity, Wanda at zero steps, N:M validity, end to end."""
import json
import re

import pytest
import torch

import sdsengine
from sdsengine import cli
from sdsengine.algorithms import besa, besa_nm, besa_plot
from sdsengine.algorithms.besa_block import BestIterate, block_loss, channel_energy, learn
from sdsengine.algorithms.besa_nm import SelectionLearner
from sdsengine.algorithms.stats import InputNorms
from sdsengine.config import BESAConfig, WandaConfig
from sdsengine.masks import nm_mask
from sdsengine.pipeline import adapters
from sdsengine.pipeline.sequential import LayerContext, run_layer
from tiny_models import tiny_model, tiny_tokens

FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "gemma3", "phi3", "opt", "gpt2"]


class _ToyBlock(torch.nn.Module):
    """A residual MLP block in float64 end to end (real decoder layers upcast norms and softmax to fp32,
    which would drown a finite-difference check)."""

    def __init__(self, hidden=16, inner=32):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(hidden, inner)
        self.down = torch.nn.Linear(inner, hidden)

    def forward(self, x, **kwargs):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _context(dtype=torch.float64, nsamples=2, seqlen=8):
    """A block with its statistics, inputs and dense outputs, as the pipeline builds them."""
    layer = _ToyBlock().to(dtype)
    inps, kwargs = torch.randn(nsamples, seqlen, 16, dtype=dtype, generator=torch.Generator().manual_seed(0)), {}
    targets = adapters.linear_modules(layer)
    stats = {name: InputNorms(adapters.get_weight(m).shape[1], "cpu") for name, m in targets.items()}
    hooks = [m.register_forward_hook(lambda mod, a, out, s=stats[n]: s.add_batch(a[0])) for n, m in targets.items()]
    outs = torch.empty_like(inps)
    run_layer(layer, inps, outs, kwargs, "cpu")
    for h in hooks:
        h.remove()
    return LayerContext(layer, targets, stats, inps, outs, kwargs, torch.device("cpu"))


def _objective(ctx, learner, kind):
    energy = channel_energy(ctx.outs, ctx.device)
    loss = sum(block_loss(ctx, learner.masked_weights(kind), j, ctx.outs, energy) for j in range(ctx.inps.shape[0]))
    return loss + learner.penalty()


def _randomize(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _probe(params, count=6, seed=1):
    """A few (parameter number, flat index) pairs to check by finite differences."""
    g = torch.Generator().manual_seed(seed)
    return [(k, int(torch.randint(p.numel(), (1,), generator=g)))
            for k, p in enumerate(params) for _ in range(count // len(params) + 1)]


def _central_difference(f, p, i, eps=1e-5):
    with torch.no_grad():
        flat = p.view(-1)
        flat[i] += eps
        up = f()
        flat[i] -= 2 * eps
        down = f()
        flat[i] += eps
    return (up - down) / (2 * eps)


def _learners(ctx):
    yield besa.RateLearner(ctx, BESAConfig(sparsity="0.5", mode="layer", candidates=10))
    yield SelectionLearner(ctx, BESAConfig(sparsity="2:4", mode="layer"))


@pytest.mark.parametrize("which", [0, 1], ids=["rates", "nm-selection"])
def test_soft_path_gradient_matches_finite_differences(which):
    ctx = _context()
    learner = list(_learners(ctx))[which]
    params = learner.parameters()
    _randomize(params)
    loss = _objective(ctx, learner, "soft")
    grads = torch.autograd.grad(loss, params)
    for k, i in _probe(params):
        fd = _central_difference(lambda: float(_objective(ctx, learner, "soft")), params[k], i)
        assert float(grads[k].view(-1)[i]) == pytest.approx(fd, rel=1e-5, abs=1e-10), (k, i)


@pytest.mark.parametrize("which", [0, 1], ids=["rates", "nm-selection"])
def test_ste_gradient_is_hard_path_gradient_through_soft_keep(which):
    """STE: dL/dθ = Σ dL/dM|_{M_hard} · dP/dθ; dP/dθ checked by finite differences."""
    ctx = _context()
    learner = list(_learners(ctx))[which]
    params = learner.parameters()
    _randomize(params)
    grads = torch.autograd.grad(_objective(ctx, learner, "ste"), params)
    parts = learner.rates if which == 0 else learner.selections
    hard = {name: part.mask("hard").double().requires_grad_() for name, part in parts.items()}
    energy = channel_energy(ctx.outs, ctx.device)
    weights = {name: adapters.get_weight(ctx.targets[name]) * m for name, m in hard.items()}
    rec = sum(block_loss(ctx, weights, j, ctx.outs, energy) for j in range(ctx.inps.shape[0]))
    g_mask = dict(zip(hard, torch.autograd.grad(rec, list(hard.values()))))

    def contracted():
        return sum(float((g_mask[name] * part.mask("soft")).sum()) for name, part in parts.items())

    for k, i in _probe(params):
        penalty_grad = _central_difference(lambda: float(learner.penalty()), params[k], i)
        expected = _central_difference(contracted, params[k], i) + penalty_grad
        assert float(grads[k].view(-1)[i]) == pytest.approx(expected, rel=1e-5, abs=1e-10), (k, i)


@pytest.mark.parametrize("weight_dtype,soft_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                                     (torch.bfloat16, torch.float32)])
def test_the_one_op_ste_is_the_three_op_form_bit_for_bit(weight_dtype, soft_dtype):
    """masked_weight(.., 'ste') against sg(W) ⊙ (M_hard − sg(P) + P) cast to W's dtype, as the block runs it:
    the same masked weight (signed zeros included) and the same gradient reaching P."""
    from sdsengine.algorithms.besa_block import masked_weight
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 96, generator=g).to(weight_dtype)
    logits = torch.randn(64, 96, generator=g, dtype=soft_dtype) * 4
    hard = torch.rand(64, 96, generator=g) < 0.5
    upstream = torch.randn(64, 96, generator=g).to(weight_dtype)

    class Part:
        def hard_and_soft(self):
            return hard, torch.sigmoid(theta)

    results = []
    for one_op in (True, False):
        theta = logits.clone().requires_grad_()
        soft = torch.sigmoid(theta)
        masked = (masked_weight(weight, Part(), "ste") if one_op else
                  (weight * (hard.to(soft_dtype) - soft.detach() + soft)).to(weight_dtype))
        masked.backward(upstream)
        results.append((masked.detach(), theta.grad))
    (one, one_grad), (three, three_grad) = results
    assert torch.equal(one, three) and torch.equal(torch.signbit(one), torch.signbit(three))
    assert one.dtype == weight_dtype and torch.equal(one_grad, three_grad)


def test_project_counts_hand_checked():
    alpha = torch.tensor([0.25, 0.5, 0.75])
    cols = torch.tensor([4.0, 4.0, 4.0])
    assert besa.project_counts(alpha, cols, 6).tolist() == [1, 2, 3]
    assert besa.project_counts(alpha, cols, 7).tolist() == [2, 2, 3]  # equal remainders: lower row first
    assert besa.project_counts(alpha, cols, 12).tolist() == [4, 4, 4]
    assert besa.project_counts(torch.full((3,), 0.5), torch.tensor([6.0, 4.0, 2.0]), 6).tolist() == [3, 2, 1]
    # 30·(0.5 + 1/30) = 16: cols·α' = 5.33, 10.67 rounds up the larger remainder, not the lower row
    assert besa.project_counts(torch.full((2,), 0.5), torch.tensor([10.0, 20.0]), 16).tolist() == [5, 11]


def _block_sparsity(layer_report):
    infos = layer_report.linears.values()
    zeros = sum(i["sparsity"] * i["shape"][0] * i["shape"][1] for i in infos)
    return zeros / sum(i["shape"][0] * i["shape"][1] for i in infos)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("target,mode", [("0.5", "row"), ("0.3", "row"), ("0.7", "row"), ("0.6", "layer")])
def test_counted_block_sparsity_meets_target(family, target, mode):
    result = sdsengine.prune(tiny_model(family), BESAConfig(sparsity=target, mode=mode, lr=0.5),
                             tiny_tokens(), progress=False)
    for layer in result.layers:
        assert abs(_block_sparsity(layer) - float(target)) <= 1e-3, layer.index


def _pruned_weights(config, family="llama"):
    model = tiny_model(family)
    sdsengine.prune(model, config, tiny_tokens(), progress=False)
    return {f"{i}.{n}": adapters.get_weight(m).clone() for i, layer in enumerate(adapters.decoder_layers(model))
            for n, m in adapters.linear_modules(layer).items()}


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8"])
@pytest.mark.parametrize("mode", ["row", "layer"])
def test_zero_epochs_is_wanda_exactly(pattern, mode):
    ours = _pruned_weights(BESAConfig(sparsity=pattern, epochs=0, mode=mode))
    wanda = _pruned_weights(WandaConfig(sparsity=pattern))
    for name in wanda:
        assert torch.equal(ours[name], wanda[name]), name


def test_trace_shows_the_learning_steps_pace_and_each_phase(monkeypatch, capsys):
    """SDSENGINE_TRACE=1: every TRACE_EVERY learning steps a line with the steps' seconds so far (the steps are one
    phase, minutes long on a large layer), and each phase's seconds as it ends."""
    from sdsengine.algorithms import besa_block
    monkeypatch.setenv("SDSENGINE_TRACE", "1")
    monkeypatch.setattr(besa_block, "TRACE_EVERY", 2)
    sdsengine.prune(tiny_model("llama"), BESAConfig(sparsity="2:4", epochs=2, lr=0.5), tiny_tokens(), progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdsengine: besa ")]
    paced = [m for line in lines if (m := re.match(r"sdsengine: besa (\d+) of (\d+) steps: [\d.]+ s$", line))]
    per_block = list(range(2, int(paced[0].group(2)) + 1, 2))  # each decoder layer (block) in turn
    assert [int(m.group(1)) for m in paced] == per_block * (len(paced) // len(per_block)) and per_block
    assert {line.split()[2] for line in lines} >= {"setup:", "steps:", "checks:", "apply:"}


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nm_always_valid_and_learns(pattern, family):
    # the last iterate (no checks, no guard): otherwise the tiny model may keep Wanda's start
    config = BESAConfig(sparsity=pattern, epochs=3, lr=0.5, nm_checks=0, guard="off")
    result = sdsengine.prune(tiny_model(family), config, tiny_tokens(), progress=False)
    moved = []
    for layer in result.layers:
        for name, info in layer.linears.items():
            assert info["nm_violations"] == 0 and info["sparsity"] == 0.5, name
            moved.append(layer.steps[name]["changed_vs_wanda"])
    assert max(moved) > 0  # with a large lr the selection does leave Wanda's


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_end_to_end_leaves_model_clean(family, pattern):
    model = tiny_model(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = sdsengine.prune(model, BESAConfig(sparsity=pattern), tiny_tokens(), progress=False)
    assert len(result.layers) == 2 and all(r.error > 0 for r in result.layers)
    assert all(abs(_block_sparsity(r) - 0.5) <= 1e-3 for r in result.layers)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        if not any(k in name for k in ("proj", "fc", "attn.c_", "mlp.c_")) or "bias" in name:
            assert torch.equal(p, before[name]), name  # only the targeted weights change
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not hasattr(module, "parametrizations")
    assert torch.isfinite(model(tiny_tokens(1, 8)).logits).all()
    json.dumps(result.report)  # the report (with the allocation) is JSON


def test_allocation_report_and_plot():
    model = tiny_model("llama")
    result = sdsengine.prune(model, BESAConfig(sparsity="0.5", lr=0.5), tiny_tokens(), progress=False)
    report = json.loads(json.dumps(result.report))
    items = besa_plot.allocations(report)
    assert len(items) == 2 * 7
    info = report["layers"][0]["steps"]["mlp.down_proj"]
    rows = besa_plot.row_sparsity(info)
    assert len(rows) == 64 and rows.min() == pytest.approx(info["row_sparsity_min"])
    assert sum(info["row_sparsity_hist10"]) == 64
    assert "mlp.down_proj" in besa_plot.text_report(report)
    assert besa_plot.svg(report).startswith("<svg")


@pytest.mark.parametrize("recipe, says", [
    ({"method": "wanda", "sparsity": "0.5"}, "the run is wanda, not BESA"),
    ({"method": "besa", "sparsity": "2:4"}, "a BESA N:M run learns a selection"),
    ({"method": "sds", "sparsity": "2:4", "base_recipe": {"method": "besa"}}, "a BESA N:M run learns a selection"),
])
def test_the_plot_says_why_a_report_has_no_allocation(tmp_path, capsys, recipe, says):
    path = tmp_path / "sdsengine.json"
    path.write_text(json.dumps({"recipe": recipe, "layers": [{"index": 0, "steps": {}}]}))
    assert besa_plot.main([str(path)]) == 1
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "column"}, "mode must be one of row, layer"),
    ({"epochs": -1}, "epochs >= 0"),
    ({"lr": 0.0}, "lr > 0"),
    ({"candidates": 1}, "candidates >= 2"),
    ({"smoothing": "yes"}, "smoothing must be one of"),
    ({"smoothing": "on", "sparsity": "0.7"}, "needs --smoothing off"),
    ({"smoothing": "on", "sparsity": "0.3"}, r"0.3 \(outside \[0.4, 0.6\]\) needs --smoothing off"),
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),
    ({"penalty": float("inf")}, "penalty must be a finite number"),
    ({"sequential": "linear"}, "--sequential linear applies to per-linear methods"),
    ({"target": "dense"}, "target must be one of dense_block, dense_model"),
    ({"nm_scores": "magnitude,hessian"}, "unknown nm_scores"),
    ({"nm_scores": "", "sparsity": "2:4"}, "nothing to learn"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"sparsity": "0"}, "sparsity above 0"),
    ({"nm_checks": -1}, "nm_checks >= 0"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BESAConfig(**{"sparsity": "0.5", **kwargs})


def test_smoothing_auto_turns_off_out_of_reach():
    assert BESAConfig(sparsity="0.5").sigmoid and not BESAConfig(sparsity="0.7").sigmoid
    assert not BESAConfig(sparsity="0.3").sigmoid  # below the sigmoid's reach too
    assert not BESAConfig(sparsity="0.5", smoothing="off").sigmoid


def test_step_size_default_follows_the_step_count():
    """N:M's Adam step size is 0.8 / steps unless --lr is given; unstructured keeps 0.05, Prodigy 1.0."""
    assert BESAConfig(sparsity="2:4").step_size(16) == pytest.approx(0.05)
    assert BESAConfig(sparsity="4:8").step_size(128) == pytest.approx(0.00625)
    assert BESAConfig(sparsity="0.5").step_size(128) == 0.05
    assert BESAConfig(sparsity="0.5").step_size(64, batch=2) == 0.1  # half the steps, as far
    assert BESAConfig(sparsity="2:4").step_size(64, batch=2) == pytest.approx(0.0125)  # 0.8 / steps already
    assert BESAConfig(sparsity="2:4", lr=0.3).step_size(128) == 0.3
    assert BESAConfig(sparsity="2:4", optimizer="prodigy").step_size(128) == 1.0


def test_cli_lr_is_a_number_for_besa():
    """BESA's lr defaults to None, SDS's to 0.1: the shared --lr flag still parses as a float."""
    args = cli.build_parser().parse_args(["prune", "--method", "besa", "--sparsity", "2:4", "--lr", "0.01",
                                          "--out", "x"])
    assert args.lr == 0.01


def test_report_names_the_step_size_used():
    config = BESAConfig(sparsity="2:4", nm_checks=0)
    result = sdsengine.prune(tiny_model("llama"), config, tiny_tokens(nsamples=4), progress=False)
    assert all(layer.steps["_block"]["lr"] == pytest.approx(0.8 / 4) for layer in result.layers)


def test_cli_flags(tmp_path, capsys):
    args = ["prune", "--method", "besa", "--sparsity", "0.7", "--smoothing", "on", "--out", str(tmp_path / "x")]
    assert cli.main(args) == 2
    assert "needs --smoothing off" in capsys.readouterr().err
    assert cli.main(["prune", "--method", "wanda", "--sparsity", "0.5", "--mode", "row", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_dense_model_target(pattern):
    """target dense_model regresses on the dense model's block outputs: layer 0 (same inputs on both
    streams) learns exactly what dense_block learns; layer 1 learns against another target; the pattern and
    the block's count hold either way."""
    runs = {t: sdsengine.prune(tiny_model("llama"), BESAConfig(sparsity=pattern, target=t, epochs=3, lr=0.5),
                               tiny_tokens(), progress=False) for t in ("dense_block", "dense_model")}
    first = {t: r.layers[0].steps["_block"] for t, r in runs.items()}
    assert first["dense_model"]["loss_last"] == pytest.approx(first["dense_block"]["loss_last"], rel=1e-5)
    second = {t: r.layers[1].steps["_block"]["loss_first"] for t, r in runs.items()}
    assert second["dense_model"] != pytest.approx(second["dense_block"], rel=1e-3)
    for layer in runs["dense_model"].layers:
        assert abs(_block_sparsity(layer) - 0.5) <= 1e-3
        assert all(info["nm_violations"] in (0, None) for info in layer.linears.values())


@pytest.mark.parametrize("pattern", ["0.6", "2:4"])
def test_guard_keeps_the_lower_layer_error(pattern):
    """Layer 0 sees the same inputs in every run: with the guard its error is the lower of the learned
    masks' (guard off) and the start's (zero epochs); the block's count still meets the target."""
    harsh = dict(sparsity=pattern, epochs=3, lr=2.0)  # a step size that can make learning hurt
    errors = {}
    for name, config in (("learned", BESAConfig(**harsh, guard="off")), ("start", BESAConfig(**harsh | {"epochs": 0})),
                         ("guarded", BESAConfig(**harsh))):
        result = sdsengine.prune(tiny_model("llama"), config, tiny_tokens(), progress=False)
        errors[name] = result.layers[0].error
        if name == "guarded":
            guard = result.layers[0].steps["self_attn.q_proj"]["layer_guard"]
            assert abs(_block_sparsity(result.layers[0]) - float(config.sparsity.sparsity)) <= 1e-3
    assert errors["guarded"] == pytest.approx(min(errors["learned"], errors["start"]), rel=1e-5)
    assert guard["chosen"] == pytest.approx(errors["learned"], rel=1e-5)
    assert guard["fallback"] == pytest.approx(errors["start"], rel=1e-5)


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_report_describes_the_masks_the_guard_kept(pattern):
    """A harsh step size makes learning hurt, so the guard keeps the start masks: the report's allocation
    (rows) or changed_vs_wanda must then describe those, not the discarded learned ones."""
    model = tiny_model("llama")
    config = BESAConfig(sparsity=pattern, epochs=4, lr=20.0, nm_checks=0, smoothing="off", penalty=0.0)
    result = sdsengine.prune(model, config, tiny_tokens(), progress=False)
    kept = 0
    for layer, module in zip(result.layers, adapters.decoder_layers(model)):
        for name, linear in adapters.linear_modules(module).items():
            info = layer.steps[name]
            assert "fallback_info" not in info
            zeros = (adapters.get_weight(linear) == 0).sum(dim=1)
            if config.sparsity.nm:
                if info["layer_guard"]["kept"] == "fallback":
                    assert info["changed_vs_wanda"] == 0.0
            else:
                assert besa_plot.row_sparsity(info).tolist() == (zeros / linear.in_features).tolist(), name
            kept += info["layer_guard"]["kept"] == "fallback"
    assert kept  # the case under test happened


def test_changed_vs_wanda_counts_kept_weights():
    config = BESAConfig(sparsity="2:4")
    selection = besa_nm.GroupSelection(torch.randn(4, 8), torch.ones(8), config, torch.float32)
    keep = selection.wanda_mask.clone()
    assert selection.changed(keep) == 0.0
    first_group = keep[0, :4]
    first_group.copy_(~first_group)  # one group of 8 kept weights swapped both of its kept weights
    assert selection.changed(keep) == pytest.approx(2 / 16)


def test_best_iterate_check_steps():
    assert [s for s in range(70) if BestIterate.due(s)] == [0, 8, 16, 32, 64]


@pytest.mark.parametrize("lr", [0.05, 3.0])
def test_nm_learning_keeps_the_best_checked_iterate(lr):
    """The learner ends at the checked iterate with the lowest hard-mask loss on the check windows (the
    start among them), which is what the record says; without checks it ends at the last step."""
    ctx = _context(nsamples=20)
    config = BESAConfig(sparsity="2:4", lr=lr)
    learner = SelectionLearner(ctx, config)
    _, record = learn(ctx, learner, config, checks=5)
    steps, losses = zip(*record["checks"])
    assert steps == (0, 8, 16, 20) and record["kept_step"] == steps[losses.index(min(losses))]
    windows = [0, 5, 10, 14, 19]
    energy = channel_energy(ctx.outs, ctx.device)
    with torch.no_grad():
        weights = learner.masked_weights("hard")
        now = sum(float(block_loss(ctx, weights, j, ctx.outs, energy)) for j in windows) / len(windows)
    assert now == pytest.approx(min(losses), rel=1e-12) and min(losses) <= losses[0]
    last = SelectionLearner(ctx, config)
    assert learn(ctx, last, config)[1] == {"lr": lr, "batch": 1}  # no checks: no record of them
    with torch.no_grad():
        moved = [float(p.abs().sum()) for p in last.parameters()]
    assert max(moved) > 0


@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_nm_checks_in_the_report(pattern):
    """The pipeline passes --nm-checks to N:M learning and reports the checks; unstructured ignores it
    (its iterates are not yet projected onto the block's count, so their losses do not compare)."""
    config = BESAConfig(sparsity=pattern, epochs=2, lr=0.5, nm_checks=4)
    result = sdsengine.prune(tiny_model("llama"), config, tiny_tokens(), progress=False)
    for layer in result.layers:
        block = layer.steps["_block"]
        if pattern == "2:4":
            assert block["checks"][0][0] == 0 and block["kept_step"] in [s for s, _ in block["checks"]]
            assert all(info["nm_violations"] == 0 for info in layer.linears.values())
        else:
            assert "checks" not in block



@pytest.mark.parametrize("mode", ["row", "layer"])
@pytest.mark.parametrize("target,penalty_at_half", [("0.3", 20 / 9), ("0.55", 5 / 121)])
def test_learning_starts_at_the_target_and_the_penalty_is_relative(mode, target, penalty_at_half):
    """θ0 puts every row (or linear) at α = s*, so the expected sparsity (layer mode's one rate standing for
    all the linear's rows) starts at s* and the penalty at 0; every row at α = 0.5 (θ = 0) pays
    5·((0.5 − s*)/s*)²: 20/9 at 0.3, 5/121 at 0.55."""
    learner = besa.RateLearner(_context(), BESAConfig(sparsity=target, mode=mode, smoothing="off"))
    with torch.no_grad():
        assert float(learner.expected_sparsity()) == pytest.approx(float(target), abs=1e-9)
        assert float(learner.penalty()) == pytest.approx(0.0, abs=1e-12)
        for p in learner.parameters():
            p.zero_()
        assert float(learner.expected_sparsity()) == pytest.approx(0.5, abs=1e-9)
        assert float(learner.penalty()) == pytest.approx(penalty_at_half, rel=1e-6)


@pytest.mark.parametrize("candidates", [5, 40])
def test_rate_masks_follow_their_definitions(candidates):
    """hard: row r drops its ⌊C α_r⌋ lowest-ranked weights; soft: P_rj = Σ_{d: ⌊C d/K⌋ ≤ rank_r(j)} β_rd,
    by brute force (the gradient tests take both from the learner, so they cannot see an error here). K = 5
    puts ranks on the thresholds, K = 40 > C repeats them."""
    learner = besa.RateLearner(_context(), BESAConfig(sparsity="0.5", candidates=candidates, smoothing="off"))
    _randomize(learner.parameters())
    with torch.no_grad():
        for rates in learner.rates.values():
            beta = rates.beta()
            zeros = torch.floor(rates.cols * rates.alpha(beta)).long()
            hard = rates.mask("hard")
            assert torch.equal((~hard).sum(dim=1), zeros)
            assert torch.equal(hard, rates.rank >= zeros.reshape(-1, 1))
            thresholds = rates.cols * torch.arange(candidates + 1) // candidates
            below = thresholds.reshape(1, 1, -1) <= rates.rank.unsqueeze(-1)
            expected = (beta.unsqueeze(1) * below).sum(dim=-1)
            assert torch.allclose(rates.mask("soft"), expected, rtol=1e-12, atol=1e-15)


def test_project_counts_meets_round_of_the_target():
    """apply leaves exactly round(s*·N) zeros: 0.7 · 1024 = 716.8 -> 717."""
    ctx = _context()
    learner = besa.RateLearner(ctx, BESAConfig(sparsity="0.7"))
    learner.apply()
    assert learner.counted_zeros == 717
    assert sum(int((adapters.get_weight(m) == 0).sum()) for m in ctx.targets.values()) == 717


def test_wanda_ranks_break_ties_by_lower_index():
    ranks = besa.wanda_ranks(torch.ones(2, 64), torch.ones(64))
    assert torch.equal(ranks, torch.arange(64, dtype=torch.int32).expand(2, -1))


def test_the_penalty_steers_learning():
    """A huge penalty weight keeps the expected sparsity nearer the target than none does."""
    drift = []
    for penalty in (0.0, 1e6):
        ctx = _context(nsamples=4)
        config = BESAConfig(sparsity="0.5", penalty=penalty, lr=0.2, smoothing="off")
        learner = besa.RateLearner(ctx, config)
        learn(ctx, learner, config)
        drift.append(abs(float(learner.expected_sparsity().detach()) - 0.5))
    assert drift[1] < drift[0]


class _LinearBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3, bias=False, dtype=torch.float64)

    def forward(self, x, **kwargs):
        return self.proj(x)


def test_block_loss_is_error_over_channel_energy():
    """Every weight masked: the block outputs 0, so each channel's error is its energy and the loss averaged
    over the windows is 1 per live channel; a dead channel (zero target, floored energy) adds 0, not NaN."""
    layer = _LinearBlock()
    with torch.no_grad():
        layer.proj.weight[2] = 0
    inps = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = layer(inps).detach()
    ctx = LayerContext(layer, {"proj": layer.proj}, {}, inps, outs, {}, torch.device("cpu"))
    energy = channel_energy(outs, ctx.device)
    masked = {"proj": torch.zeros(3, 4, dtype=torch.float64)}
    losses = [float(block_loss(ctx, masked, j, outs, energy)) for j in range(3)]
    assert sum(losses) / 3 == pytest.approx(2 / 3, rel=1e-12)


def test_nm_soft_keep_is_centred_between_the_nth_and_next_score():
    """P = sigmoid((c − τ)/T), τ midway between a group's n-th and (n+1)-th scores: 1.5 here, T = 0.2."""
    selection = besa_nm.GroupSelection(torch.randn(1, 8), torch.ones(8), BESAConfig(sparsity="2:4"), torch.float64)
    c = torch.tensor([[0.0, 1.0, 2.0, 3.0, 3.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(selection.keep_prob(c), torch.sigmoid((c - 1.5) / 0.2), rtol=1e-12)


def test_nm_magnitude_candidate_is_the_weight_magnitude():
    """With a huge magnitude weight φ, the selection is the N:M mask of |W|, not Wanda's (the norms differ)."""
    g = torch.Generator().manual_seed(0)
    weight, norms = torch.randn(4, 16, generator=g), torch.rand(16, generator=g) * 10
    config = BESAConfig(sparsity="2:4", nm_scores="magnitude")
    selection = besa_nm.GroupSelection(weight, norms, config, torch.float64)
    assert not torch.equal(selection.wanda_mask, nm_mask(weight.abs(), 2, 4))  # else the test shows nothing
    with torch.no_grad():
        selection.phi.fill_(1e6)
    assert torch.equal(selection.mask("hard"), nm_mask(weight.abs(), 2, 4))


def test_nm_start_is_wandas_mask_with_zero_weights():
    """Zeros score below every positive weight: the first mask keeps 1e-3 over the zeros beside it."""
    weight = torch.tensor([[0.0, 0.0, 1e-3, 1.0], [0.5, 0.2, 0.0, 0.3]])
    selection = besa_nm.GroupSelection(weight, torch.ones(4), BESAConfig(sparsity="2:4"), torch.float64)
    assert selection.mask("hard").tolist() == [[False, False, True, True], [True, False, False, True]]


@pytest.mark.parametrize("mode,rows", [("layer", 1), ("row", 4)])
def test_nm_layer_mode_shares_the_mixing(mode, rows):
    selection = besa_nm.GroupSelection(torch.randn(4, 8), torch.ones(8), BESAConfig(sparsity="2:4", mode=mode),
                                       torch.float32)
    assert selection.phi.shape == (rows, 1)


def test_nm_best_iterate_ties_keep_the_earlier_step():
    """A step too small to change any mask ties every check: the record names the start, which was kept."""
    ctx = _context(nsamples=10)
    config = BESAConfig(sparsity="2:4", lr=1e-12)
    _, record = learn(ctx, SelectionLearner(ctx, config), config, checks=3)
    assert len({loss for _, loss in record["checks"]}) == 1 and record["kept_step"] == 0
