"""SDS (Sparse-Dense-Sparse): each step on hand-made statistics, the pattern invariants, the guard, the
per-step report through the pipeline, and the config/CLI surface."""
import ast
import json
import subprocess
import sys

import pytest
import torch

import sdsengine
from sdsengine.algorithms import least_squares, sds, sparsegpt
from sdsengine.algorithms.stats import Hessian
from sdsengine.cli import build_parser, main
from sdsengine.config import BESAConfig, SDSConfig, SparseGPTConfig
from sdsengine.masks import nm_mask, nm_violations
from sdsengine.pipeline import adapters
from sdsengine.pipeline.capture import capture_layer_inputs
from sdsengine.pipeline.sequential import layer_guard, run_layer
from tiny_models import correlated_layer, layer_outputs, tiny_model, tiny_tokens

STEPS = ("initial", "redense", "second", "adjust", "refit", "chosen")


def _final(steps):
    """The error of SDS's own result: after the swaps, else after the refit, else after the adjustment."""
    return steps.get("swaps", steps.get("refit", steps["adjust"]))


def _layer(out=24, inp=32, tokens=256, seed=0):
    return correlated_layer(out, inp, tokens, seed)


def _config(**kw):
    return SDSConfig(**{"blocksize": 16, **kw})


def _calibration_error(v, w, H):
    return float(least_squares.quadratic(v - w, H) / least_squares.quadratic(w, H))


def test_redense_without_regularization_returns_to_dense():
    w, stats = _layer()
    config = _config(l1=0.0, l2=0.0, lr=1.0, iters=2000)
    w1 = sds.BASES["sparsegpt"](w, stats, config)
    w_re = sds.redense(w1, least_squares.Objective(w, stats), config)
    assert _calibration_error(w1, w, stats.H) > 1e-2
    assert _calibration_error(w_re, w, stats.H) < 1e-6


def test_closed_form_matches_iterations():
    w, stats = _layer()
    closed = sds.redense(w, least_squares.Objective(w, stats), _config(solver="closed", l1=0.0, l2=0.5, reduction="token"))
    fista = sds.redense(w, least_squares.Objective(w, stats), _config(l1=0.0, l2=0.5, reduction="token", lr=1.0, iters=3000))
    torch.testing.assert_close(fista, closed, atol=1e-4, rtol=1e-4)


def test_anchor_in_closed_form_and_iterations_alike():
    w, stats = _layer()
    config = dict(l1=0.0, l2=0.1, anchor=0.5, reduction="token")
    w1 = sds.BASES["sparsegpt"](w, stats, _config(**config))
    closed = sds.redense(w1, least_squares.Objective(w, stats), _config(solver="closed", **config))
    fista = sds.redense(w1, least_squares.Objective(w, stats), _config(lr=1.0, iters=3000, **config))
    torch.testing.assert_close(fista, closed, atol=1e-4, rtol=1e-4)


def test_step_size_counts_the_l2_term():
    """The step is lr / (L + 2 l2'): an L2 weight well above H's curvature must not make the proximal steps
    diverge (a step of 1 / L alone overshoots by (L + 2 l2') / L)."""
    w, stats = _layer()
    l2 = 10 * least_squares.top_eigenvalue(stats.H)  # reduction "token": l2' = l2
    closed = sds.redense(w, least_squares.Objective(w, stats), _config(solver="closed", l1=0.0, l2=l2, reduction="token"))
    fista = sds.redense(w, least_squares.Objective(w, stats), _config(l1=0.0, l2=l2, reduction="token", lr=1.0, iters=200))
    torch.testing.assert_close(fista, closed, atol=1e-4, rtol=1e-4)


def test_step_size_holds_where_every_tokens_inputs_sum_to_zero():
    """H·1 = 0 with H ≠ 0 (mean-centred inputs): the power iteration's ones start collapses; the estimate must
    still bound the top eigenvalue, or the proximal steps diverge."""
    g = torch.Generator().manual_seed(0)
    weights = torch.randint(0, 4, (32, 32), generator=g).float().triu(1)
    weights = weights + weights.T
    H = torch.diag(weights.sum(dim=1)) - weights  # a graph Laplacian: PSD, rows summing to exactly zero
    assert torch.equal(H @ torch.ones(32), torch.zeros(32))
    top = float(torch.linalg.eigvalsh(H.double())[-1])
    assert top <= least_squares.top_eigenvalue(H) <= 1.1 * top
    assert least_squares.top_eigenvalue(torch.zeros(8, 8)) == 1.0


def test_anchor_limits_how_far_each_step_moves():
    w, stats = _layer()
    w1 = sds.BASES["sparsegpt"](w, stats, _config())
    moved = {a: float((sds.redense(w1, least_squares.Objective(w, stats), _config(anchor=a, lr=1.0)) - w1).norm())
             for a in (0.0, 0.1, 10.0)}
    assert moved[0.0] > moved[0.1] > moved[10.0] > 0


def test_l1_shrinks_the_redense_weights():
    w, stats = _layer()
    free = sds.redense(w, least_squares.Objective(w, stats), _config(l1=0.0, l2=0.0, reduction="token", lr=1.0))
    shrunk = sds.redense(w, least_squares.Objective(w, stats), _config(l1=5.0, l2=0.0, reduction="token", lr=1.0))
    assert shrunk.abs().sum() < free.abs().sum()
    assert (shrunk == 0).sum() > (free == 0).sum()


def test_anchor_holds_the_adjustment_near_w2():
    """With the anchor a, the adjustment's steps descend the error + a ||V - W2||^2 at a stable step: on W2's
    mask every iterate lies between W2 and that minimiser, within |g| / (2a) of W2 (g: the error's gradient
    at W2 on the mask). Dropping the anchor from the steps, or from the step size, moves it further."""
    w, stats = _layer()
    config = _config(sparsity="2:4", anchor=100.0)
    objective = least_squares.Objective(w, stats)
    w2 = sds.BASES["sparsegpt"](w, stats, config)
    w3 = sds.adjust(w2, objective, config, w2 != 0)
    a = sds.anchor_weight(objective, config)
    reach = float((objective.grad(w2) * (w2 != 0)).norm()) / (2 * a)
    assert 0 < float((w3 - w2).norm()) <= 1.01 * reach


@pytest.mark.parametrize("base", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_adjust_keeps_nm_pattern(base, pattern):
    w, stats = _layer()
    config = _config(base=base, sparsity=pattern, lr=1.0, iters=50)
    w2 = sds.BASES[base](w, stats, config)
    w3 = sds.adjust(w2, least_squares.Objective(w, stats), config, w2 != 0)
    assert nm_violations(w3, *config.sparsity.nm) == 0
    assert (w3 == 0).float().mean() == 1 - config.sparsity.n / config.sparsity.m
    assert not torch.equal(w3 != 0, w2 != 0)  # the mask is re-selected within the groups, not frozen
    assert _calibration_error(w3, w, stats.H) < 0.9 * _calibration_error(w2, w, stats.H)  # it moves (~0.5x)


@pytest.mark.parametrize("teacher", ["sd", "dense"])
def test_refit_solves_least_squares_on_the_mask(teacher):
    """refit = per row, the exact minimiser of the calibration error over the kept weights (a solve on
    H restricted to the row's support), the zeros untouched; on the dense teacher's statistics too."""
    w, stats = _layer(out=6, inp=48, tokens=512)
    if teacher == "dense":  # a teacher on other inputs: C, T from a shifted copy of the same tokens
        stats = _dense_stream_stats(seed=1)
    objective = least_squares.Objective(w, stats, teacher)
    w2 = sds.BASES["wanda"](w, stats, _config(base="wanda"))
    fitted = least_squares.refit(w2, objective, iters=200)
    assert torch.equal(fitted != 0, w2 != 0)
    exact = _exact_fit(w2, stats, objective)
    torch.testing.assert_close(fitted.double(), exact, atol=1e-4, rtol=1e-3)
    assert objective.error(fitted) < objective.error(w2)


def test_refit_converges_in_about_as_many_steps_as_kept_weights():
    """Conjugate gradient: on strongly mixed inputs, a few more steps than a row's kept weights reach the
    exact fit (steepest descent, even preconditioned, is far from it there)."""
    w, stats = correlated_layer(6, 32, 512, seed=0, mixing=0.6)
    objective = least_squares.Objective(w, stats)
    w2 = sds.BASES["wanda"](w, stats, _config(base="wanda", sparsity="0.5"))  # 16 kept per row
    fitted = least_squares.refit(w2, objective, iters=24)
    exact = _exact_fit(w2, stats, objective)
    torch.testing.assert_close(fitted.double(), exact, atol=1e-3, rtol=1e-3)


def _exact_fit(pruned, stats, objective):
    """Per row, the least-squares weights on the row's kept positions (a solve on H restricted to them), in fp64."""
    H, B = stats.H.double(), objective.B.double()
    exact = torch.zeros_like(B)
    for r in range(pruned.shape[0]):
        kept = (pruned[r] != 0).nonzero().squeeze(1)
        exact[r, kept] = torch.linalg.solve(H[kept][:, kept], B[r, kept])
    return exact


def _dense_stream_stats(inp=48, tokens=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    stats = Hessian(inp, "cpu")
    stats.add_batch(d + 0.2 * torch.randn(tokens, inp, generator=g), dense_x=d)
    return stats


def test_refit_restores_the_patterns_count_when_the_second_prune_overshoots():
    """Where the re-dense's L1 zeroed weights, the second prune keeps zeros among its kept entries: the
    refit's support comes from the pattern's counts (W1's), so the result is never sparser than asked."""
    w, stats = _layer()
    config = _config(base="wanda", sparsity="0.5", adjust="off", refit=50)
    w1 = sds.BASES["wanda"](w, stats, config)
    g = torch.Generator().manual_seed(3)
    overshoot = lambda v: sds.BASES["wanda"](v, stats, config) * (torch.rand(v.shape, generator=g) > 0.05)
    chosen, info = sds.reconstruct(least_squares.Objective(w, stats), w1, config, overshoot)
    assert info["choice"] == "sds" and info["refit"] < info["initial"]
    assert torch.equal((chosen != 0).sum(dim=1), (w1 != 0).sum(dim=1))


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_refit_fills_empty_slots_by_benefit(sparsity):
    """Where W2 holds fewer weights than the pattern's counts, the refit's support keeps every nonzero and
    fills each row (N:M: each group) with the empty slots of the largest one-weight gain g²/(2 H_jj), not
    the lowest indices; a full W2 is its own support."""
    w, stats = _layer()
    config = _config(base="wanda", sparsity=sparsity)
    objective = least_squares.Objective(w, stats)
    w1 = sds.BASES["wanda"](w, stats, config)
    project = sds._projector(w1 != 0, config)
    assert torch.equal(sds.refit_support(w1, objective, project), w1 != 0)
    g = torch.Generator().manual_seed(5)
    w2 = w1 * (torch.rand(w1.shape, generator=g) > 0.2)
    support = sds.refit_support(w2, objective, project)
    gain = objective.grad(w2).square() / (2 * torch.diagonal(stats.H))
    width = 4 if sparsity == "2:4" else w.shape[1]  # the unit the counts hold in: a group or a row
    units = lambda t: t.reshape(-1, width)
    assert torch.equal(units(support).sum(dim=1), units(w1 != 0).sum(dim=1))
    assert not (units(w2 != 0) & ~units(support)).any()
    added, passed_over = units(support & (w2 == 0)), units(~support & (w2 == 0))
    lowest_added = torch.where(added, units(gain), torch.inf).amin(dim=1)
    highest_passed = torch.where(passed_over, units(gain), -torch.inf).amax(dim=1)
    assert added.any() and (lowest_added >= highest_passed).all()
    position_rule = project(w2.abs()) & (w2 == 0)
    assert not torch.equal(support & (w2 == 0), position_rule)


def test_refit_never_raises_the_error():
    """Zero steps, or a weight already at its optimum, come back unchanged."""
    w, stats = _layer()
    objective = least_squares.Objective(w, stats)
    w2 = sds.BASES["sparsegpt"](w, stats, _config())
    assert torch.equal(least_squares.refit(w2, objective, iters=0), w2)
    once = least_squares.refit(w2, objective, iters=100)
    assert objective.error(once) < objective.error(w2)
    assert objective.error(least_squares.refit(once, objective, iters=100)) <= objective.error(once)


@pytest.mark.parametrize("base", ["sparsegpt", "wanda"])
def test_adjust_keeps_unstructured_counts(base):
    w, stats = _layer()
    config = _config(base=base, sparsity="0.5", lr=1.0, iters=50)
    w2 = sds.BASES[base](w, stats, config)
    w3 = sds.adjust(w2, least_squares.Objective(w, stats), config, w2 != 0)
    if base == "wanda":  # Wanda's count holds per row
        assert torch.equal((w3 != 0).sum(dim=1), (w2 != 0).sum(dim=1))
    assert (w3 != 0).sum() == (w2 != 0).sum()
    assert not torch.equal(w3 != 0, w2 != 0)  # the mask is re-selected, not frozen


@pytest.mark.parametrize("base", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("refit", [0, 50])
def test_guard_never_worse_than_base(base, seed, refit):
    w, stats = _layer(seed=seed)
    # a harsh re-dense (strong L1, few steps) and no adjustment make the base win without the refit
    config = _config(base=base, l1=50.0, reduction="token", lr=1.0, iters=5, adjust="off", refit=refit)
    pruned, info = sds.prune(w, stats, config)
    base_weight = sds.BASES[base](w, stats, config)
    assert set(STEPS) - ({"refit"} if refit == 0 else set()) <= set(info)
    assert _calibration_error(pruned, w, stats.H) <= _calibration_error(base_weight, w, stats.H) + 1e-7
    assert info["choice"] == ("base" if refit == 0 else "sds")  # both branches of the guard are reached
    if info["choice"] == "base":
        assert torch.equal(pruned, base_weight)
    assert info["chosen"] == min(info["initial"], _final(info))


def test_guard_falls_back_when_sds_loses():
    w, stats = _layer()
    config = _config(l1=50.0, reduction="token", lr=1.0, iters=5, adjust="off", refit=0)
    pruned, info = sds.prune(w, stats, config)
    assert info["choice"] == "base" and info["chosen"] == info["initial"] and "refit" not in info
    assert torch.equal(pruned, sds.BASES["sparsegpt"](w, stats, config))  # the weight returned is the base's


def test_sparsegpt_base_builds_its_inverse_hessian_factor_once(monkeypatch):
    """W1 and W2 are SparseGPT prunes on one H and damping: one factor (a Cholesky pair of in³) serves both."""
    w, stats = _layer()
    built, factor = [], sparsegpt.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt, "inverse_hessian_factor", lambda *args: built.append(args) or factor(*args))
    _, info = sds.prune(w, stats, _config(iters=5))
    assert "second" in info and len(built) == 1


def test_tf32_rounds_to_ten_mantissa_bits_ties_away():
    """The operand a TF32 product reads: 10 mantissa bits, to nearest, a tie away from zero (cvt.rna); inf, zeros
    of either sign and TF32 values unchanged."""
    tie, above = 1 + 2 ** -11, 1 + 2 ** -11 + 2 ** -13
    x = torch.tensor([1.0, tie, -tie, above, 1 + 2 ** -12, float("inf"), -float("inf"), 0.0, -0.0, 3.0 * 2 ** -130])
    want = [1.0, 1 + 2 ** -10, -(1 + 2 ** -10), 1 + 2 ** -10, 1.0, float("inf"), -float("inf"), 0.0, -0.0, 3.0 * 2 ** -130]
    got = least_squares.tf32(x)
    assert got.tolist() == want and torch.equal(torch.signbit(got), torch.signbit(torch.tensor(want)))


def test_tf32_iterations_use_rounded_operands_and_keep_the_errors_exact():
    """matmul="tf32" on the CPU: the iterations' products are those of the rounded operands (what the tensor cores
    compute, up to the order of the sums); the errors and exact_grad are fp32 as before; and SDS ends close to
    its fp32 result, the pattern held."""
    w, stats = _layer()
    fp32, tf32 = (least_squares.Objective(w, stats, matmul=m) for m in ("fp32", "tf32"))
    v = torch.randn_like(w)
    rounded = least_squares.tf32(v) @ least_squares.tf32(stats.H.float())
    assert torch.equal(tf32.product(v), rounded) and not torch.equal(fp32.product(v), rounded)
    assert torch.equal(tf32.exact_grad(v), fp32.grad(v)) and tf32.error(v) == fp32.error(v)
    ours, info = sds.prune(w, stats, _config(sparsity="2:4", iters=50, matmul="tf32"))
    theirs, fp32_info = sds.prune(w, stats, _config(sparsity="2:4", iters=50))
    assert nm_violations(ours, 2, 4) == 0 and not torch.equal(ours, theirs)
    assert info["chosen"] == pytest.approx(fp32_info["chosen"], rel=0.05)


def test_the_refit_runs_in_fp32_whatever_the_iterations_precision():
    """CG updates its residual instead of recomputing it, so TF32's rounding in each product stays in it: the
    refit takes exact products under matmul="tf32" too (reduced protocol, two seeds: 1.041x and 1.054x fp32's
    perplexity with a TF32 refit, 1.012x and 1.023x without)."""
    w, stats = _layer()
    pruned = w * nm_mask(w.abs(), 2, 4)
    fp32, tf32 = (least_squares.Objective(w, stats, matmul=m) for m in ("fp32", "tf32"))
    assert torch.equal(least_squares.refit(pruned, tf32, 20), least_squares.refit(pruned, fp32, 20))


def test_tf32_is_named_when_unknown():
    with pytest.raises(ValueError, match="matmul must be one of fp32, tf32, got 'bf16'"):
        _config(matmul="bf16")
    with pytest.raises(ValueError, match="matmul must be one of fp32, tf32"):
        least_squares.Objective(*_layer(), matmul="fp16")


TF32_SETTINGS = """
import sys, torch
from sdsengine.algorithms.least_squares import tf32_matmul
matmul = torch.backends.cuda.matmul
exec(sys.argv[1])
def settings():
    try:
        return matmul.allow_tf32, getattr(matmul, "fp32_precision", None)
    except RuntimeError:
        return "disagree", getattr(matmul, "fp32_precision", None)
before = settings()
with tf32_matmul():
    inside = settings()
print(repr((before, inside, settings())))
"""


@pytest.mark.parametrize("setup,inside", [("pass", True), ("matmul.allow_tf32 = True", True),
                                          ("matmul.fp32_precision = 'ieee'", True),
                                          ("matmul.fp32_precision = 'tf32'", "disagree")])
def test_tf32_products_leave_torchs_settings_readable_and_as_they_were(setup, inside):
    """Inside, TF32 is on and torch's two settings agree (its reader of the older one does not raise), unless they
    disagreed before (the newer one alone set to tf32, as torch advises); after, both are as they were. In a process
    of its own: the settings are global."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has one setting")
    out = subprocess.run([sys.executable, "-c", TF32_SETTINGS, setup], capture_output=True, text=True, check=True)
    before, during, after = ast.literal_eval(out.stdout.strip())
    assert during == (inside, "tf32") and after == before


@pytest.mark.gpu
def test_tf32_on_the_gpu_matches_the_cpus_emulation():
    """On CUDA the iterations' products run on the tensor cores in TF32, with torch's setting restored after: an
    error of the CPU emulation's size (its rounding to nearest; the GPU's may truncate, which errs more), far
    above fp32's."""
    w, stats = _layer(out=256, inp=512, tokens=1024)
    v = torch.randn_like(w)
    cpu = least_squares.Objective(w, stats, matmul="tf32").product(v)
    gpu_stats = Hessian(w.shape[1], "cuda")
    gpu_stats.H, gpu_stats.tokens = stats.H.cuda(), stats.tokens
    settings = lambda: [getattr(torch.backends.cuda.matmul, n, None) for n in ("fp32_precision", "allow_tf32")]
    before = settings()
    gpu = least_squares.Objective(w.cuda(), gpu_stats, matmul="tf32").product(v.cuda()).cpu()
    assert settings() == before
    exact = v.double() @ stats.H.double()
    error = lambda product: float((product.double() - exact).abs().max() / exact.abs().max())
    fp32 = error(v.cuda() @ stats.H.cuda())
    assert 10 * fp32 < error(cpu) and 10 * fp32 < error(gpu) < 50 * error(cpu)


def test_trace_prints_each_step_as_it_ends(monkeypatch, capsys):
    """SDSENGINE_TRACE=1: each step's seconds on stderr as it ends, in order (a run cut short by a time limit
    still shows where its time went); without it, nothing."""
    w, stats = _layer()
    sds.prune(w, stats, _config(iters=5))
    assert "sdsengine:" not in capsys.readouterr().err
    monkeypatch.setenv("SDSENGINE_TRACE", "1")
    _, info = sds.prune(w, stats, _config(iters=5))
    lines = [line.split() for line in capsys.readouterr().err.splitlines() if line.startswith("sdsengine: sds ")]
    assert [words[2].rstrip(":") for words in lines] == list(info["seconds"])
    assert all(float(words[3]) >= 0 and words[4] == "s" for words in lines)


def test_pipeline_reports_every_step():
    model = tiny_model("llama")
    result = sdsengine.prune(model, _config(iters=20, l1=0.0, l2=0.0, lr=1.0), tiny_tokens(), progress=False)
    for layer in result.layers:
        assert set(layer.steps) == set(adapters.linear_modules(model.model.layers[0]))
        for name, info in layer.steps.items():
            assert all(isinstance(info[s], float) and info[s] >= 0 for s in STEPS), name
            timed = set(STEPS) - {"chosen"}  # each step's seconds, the base's initial prune included
            assert timed <= set(info["seconds"]) and min(info["seconds"].values()) >= 0, name
            assert info["redense"] < info["initial"], name  # unregularized, the D step nears the dense output
            assert info["refit"] <= info["adjust"] <= info["second"], name
            assert info["chosen"] <= info["initial"], name


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt2"])
@pytest.mark.parametrize("base,pattern", [("sparsegpt", "2:4"), ("wanda", "4:8"), ("wanda", "0.5")])
def test_end_to_end_counted(family, base, pattern):
    model = tiny_model(family)
    config = _config(base=base, sparsity=pattern, iters=10)
    result = sdsengine.prune(model, config, tiny_tokens(), progress=False)
    for i, layer in enumerate(adapters.decoder_layers(model)):
        for name, module in adapters.linear_modules(layer).items():
            w = adapters.get_weight(module)
            if config.sparsity.nm:
                assert nm_violations(w, *config.sparsity.nm) == 0, (i, name)
                assert (w == 0).float().mean() == 0.5, (i, name)
            else:  # Wanda's per-row count: int(in * 0.5) zeros per row, exactly
                assert ((w == 0).sum(dim=1) >= w.shape[1] // 2).all(), (i, name)
                assert abs((w == 0).float().mean() - 0.5) < 0.01, (i, name)
    assert all(r.error is not None and r.error > 0 for r in result.layers)
    assert torch.isfinite(model(tiny_tokens(1, 8)).logits).all()


@pytest.mark.parametrize("pattern,guard", [("2:4", "linear"), ("0.5", "layer")])
def test_sds_on_besa_masks(pattern, guard):
    """--base besa: BESA's masks, then SDS's reconstruction: pattern and block sparsity hold, every linear
    reports both BESA's allocation and SDS's steps, and the guard keeps SDS no worse than BESA's weights."""
    model = tiny_model("llama")
    config = _config(base="besa", sparsity=pattern, iters=10, guard=guard)
    result = sdsengine.prune(model, config, tiny_tokens(), progress=False)
    for layer, report in zip(adapters.decoder_layers(model), result.layers):
        weights = [adapters.get_weight(m) for m in adapters.linear_modules(layer).values()]
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros == round(0.5 * sum(w.numel() for w in weights))
        if config.sparsity.nm:
            assert all(nm_violations(w, 2, 4) == 0 for w in weights)
        for name in adapters.linear_modules(layer):
            steps = report.steps[name]["sds"]
            assert steps["chosen"] == min(steps["initial"], _final(steps)), name
            assert ("layer_guard" in report.steps[name]) == (guard == "layer"), name
        assert "_block" in report.steps
    # the recipe names the BESA settings the base ran with, so a change of BESA's defaults shows in it
    base = result.report["recipe"]["base_recipe"]
    assert base["method"] == "besa" and base["sparsity"] == pattern and base["guard"] == "off"
    assert base == config.besa_base().to_dict()


def test_only_a_besa_base_adds_its_recipe():
    assert "base_recipe" not in _config(base="wanda").to_dict()
    assert "base_recipe" not in _config(base="sparsegpt").to_dict()
    assert _config(base="besa", sparsity="4:8").to_dict()["base_recipe"] == BESAConfig(sparsity="4:8",
                                                                                         guard="off").to_dict()


def test_sds_on_besa_guard_falls_back_to_besas_weights(monkeypatch):
    """--base besa with guard=layer: the fallback handed to the layer guard is BESA's masked weights as they
    were before SDS, not the module's weight after it (an fp32 weight's .float() is the same tensor)."""
    seen = []

    def recording_guard(layer, targets, fallbacks, steps, *args):
        seen.extend((name, fallbacks[name].clone(), adapters.get_weight(targets[name]).clone(), steps[name]["sds"])
                    for name in fallbacks)
        return layer_guard(layer, targets, fallbacks, steps, *args)

    monkeypatch.setattr("sdsengine.pipeline.sequential.layer_guard", recording_guard)
    sdsengine.prune(tiny_model("llama"), _config(base="besa", sparsity="2:4", iters=10, guard="layer"),
                    tiny_tokens(), progress=False)
    improved = [(name, fallback, weight) for name, fallback, weight, steps in seen
                if steps["choice"] == "sds" and steps["chosen"] < steps["initial"]]
    assert improved, "SDS improved no linear: the test shows nothing"
    for name, fallback, weight in improved:
        assert not torch.equal(fallback, weight), name


def test_layer_guard_reports_both_and_keeps_the_better():
    """guard=layer: every linear's report holds the layer's error with SDS's weights and with the base's,
    the layer's final error is the smaller one, and no weight leaks into the (JSON) report."""
    model = tiny_model("llama")
    result = sdsengine.prune(model, _config(iters=10, guard="layer"), tiny_tokens(), progress=False)
    for report in result.layers:
        guards = [info["layer_guard"] for info in report.steps.values()]
        assert all(g == guards[0] for g in guards)
        assert all("fallback" not in info for info in report.steps.values())
        assert report.error == pytest.approx(min(guards[0]["chosen"], guards[0]["fallback"]), rel=1e-5)
    json.dumps(result.report)


@pytest.mark.parametrize("teacher", ["sd", "dense"])
def test_layer_error_is_against_what_the_teacher_fits(teacher):
    """teacher=dense fits the dense model's outputs, so the layer guard judges, and the report measures,
    each layer against the dense model's output of that layer; teacher=sd against the dense layer on the
    pruned model's inputs. Checked from plain forward passes of the dense and the pruned models."""
    samples = tiny_tokens(3, 48)  # as many tokens as the widest linear has inputs: SDS re-fits every linear
    dense, model = tiny_model("llama"), tiny_model("llama")
    result = sdsengine.prune(model, _config(iters=10, guard="layer", teacher=teacher), samples, progress=False)
    dense_outs, pruned_outs = layer_outputs(dense, samples), layer_outputs(model, samples)
    _, layer_kwargs = capture_layer_inputs(dense, samples, torch.device("cpu"), torch.device("cpu"))
    for i, report in enumerate(result.layers[1:], start=1):  # layer 0: both references are the same
        if teacher == "dense":
            target = dense_outs[i]
        else:  # the dense layer on the pruned model's inputs
            target = torch.empty_like(pruned_outs[i - 1])
            run_layer(adapters.decoder_layers(dense)[i], pruned_outs[i - 1], target, layer_kwargs[i], "cpu")
        expected = float((pruned_outs[i] - target).pow(2).sum() / target.pow(2).sum())
        assert report.error == pytest.approx(expected, rel=1e-3), i
        guard = next(iter(report.steps.values()))["layer_guard"]
        assert report.error == pytest.approx(min(guard["chosen"], guard["fallback"]), rel=1e-5), i


@pytest.mark.parametrize("fallback,kept", [("dense", "fallback"), ("zeros", "chosen")])
def test_layer_guard_swaps_all_or_nothing(fallback, kept):
    """The dense weights as fallbacks beat any pruned layer (error 0); zero weights lose to it."""
    model = tiny_model("llama")
    layer = model.model.layers[0]
    targets = adapters.linear_modules(layer)
    dense = {name: adapters.get_weight(m).detach().clone() for name, m in targets.items()}
    inps, layer_kwargs = capture_layer_inputs(model, tiny_tokens(2, 16), torch.device("cpu"), torch.device("cpu"))
    kwargs = layer_kwargs[0]
    reference = torch.empty_like(inps)
    run_layer(layer, inps, reference, kwargs, "cpu")
    for name, m in targets.items():
        adapters.set_weight(m, dense[name] * (torch.rand_like(dense[name]) > 0.5))
    pruned = {name: adapters.get_weight(m).detach().clone() for name, m in targets.items()}
    fallbacks = dense if fallback == "dense" else {name: torch.zeros_like(w) for name, w in dense.items()}
    steps = {name: {} for name in targets}
    layer_guard(layer, targets, fallbacks, steps, inps, reference, kwargs, "cpu")
    expected = fallbacks if kept == "fallback" else pruned
    for name, m in targets.items():
        assert torch.equal(adapters.get_weight(m), expected[name]), name
        assert steps[name]["layer_guard"]["kept"] == kept


@pytest.mark.parametrize("kw,message", [
    ({"base": "magnitude"}, "base must be one of sparsegpt, wanda, besa"),
    ({"solver": "adam"}, "solver must be one of fista, ista, closed"),
    ({"reduction": "sum"}, "reduction must be one of element, token"),
    ({"adjust": "yes"}, "adjust must be one of on, off"),
    ({"teacher": "teacher"}, "teacher must be one of sd, dense"),
    ({"guard": "block"}, "guard must be one of linear, layer"),
    ({"lr": 0.0}, r"lr .* must be in \(0, 1\]"),
    ({"lr": 1.5}, r"lr .* must be in \(0, 1\]"),
    ({"iters": -1}, "iters, l1, l2, anchor >= 0"),
    ({"refit": -1}, "refit must be >= 0"),
    ({"l1": -0.1}, "iters, l1, l2, anchor >= 0"),
    ({"anchor": -1.0}, "iters, l1, l2, anchor >= 0"),
    ({"solver": "closed"}, "closed-form re-dense solves L2 only"),
    ({"sparsity": "2:4", "blocksize": 6}, "multiple of M=4"),
    ({"l1": float("nan")}, "SDSConfig.l1 must be a finite number, got nan"),
    ({"l2": float("inf")}, "SDSConfig.l2 must be a finite number, got inf"),
    ({"base": "besa", "sparsity": "0"}, "besa needs a sparsity above 0"),
    ({"base": "besa", "sequential": "linear"}, "sds --base besa .* use --sequential layer"),
])
def test_bad_config_values(kw, message):
    with pytest.raises(ValueError, match=message):
        SDSConfig(**kw)


def test_cli_parses_sds_flags():
    args = build_parser().parse_args(["prune", "--method", "sds", "--base", "wanda", "--sparsity", "2:4",
                                      "--lr", "0.5", "--iters", "7", "--l1", "0", "--l2", "0.2",
                                      "--solver", "ista", "--reduction", "token", "--adjust", "off", "--refit", "30",
                                      "--out", "x"])
    assert (args.base, args.lr, args.iters, args.l1, args.l2, args.refit) == ("wanda", 0.5, 7, 0.0, 0.2, 30)
    assert (args.solver, args.reduction, args.adjust) == ("ista", "token", "off")


def test_cli_rejects_sds_flag_for_other_method(tmp_path, capsys):
    assert main(["prune", "--method", "wanda", "--base", "wanda", "--sparsity", "2:4", "--out", str(tmp_path)]) == 2
    assert "--base does not apply to method 'wanda'" in capsys.readouterr().err


def test_dense_teacher_objective_matches_tokens():
    """With dense-stream inputs d, error() and grad() are the token-level error ||W d - V x||^2 and its
    gradient, from the accumulated H, C, T alone."""
    w, _ = _layer()
    g = torch.Generator().manual_seed(1)
    x, d = torch.randn(300, 32, generator=g), torch.randn(300, 32, generator=g)
    stats = Hessian(32, "cpu")
    for rows in (slice(0, 100), slice(100, 300)):  # two batches: the running average must hold
        stats.add_batch(x[rows], d[rows])
    v = torch.randn(24, 32, generator=g).requires_grad_()
    objective = least_squares.Objective(w, stats, "dense")
    loss = ((d @ w.T - x @ v.T) ** 2).sum() / 300  # = ½ · 2/N · sum ||W d - V x||^2
    loss.backward()
    torch.testing.assert_close(objective.grad(v.detach()), v.grad, rtol=1e-4, atol=1e-4)
    reference = float(loss.detach()) / float(((d @ w.T) ** 2).sum() / 300)
    assert abs(objective.error(v.detach()) - reference) < 1e-4 * reference


def test_sd_teacher_error_is_relative_to_the_teachers_output():
    """error() is ||W x - V x||^2 over ||W x||^2 on the calibration tokens: 1 for V = 0, 0 for V = W."""
    w, _ = _layer()
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    stats = Hessian(32, "cpu")
    stats.add_batch(x)
    objective = least_squares.Objective(w, stats)
    v = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5)
    reference = float(((x @ (w - v).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert abs(objective.error(v) - reference) < 1e-4 * reference
    assert abs(objective.error(torch.zeros_like(w)) - 1.0) < 1e-5 and objective.error(w) == 0.0


def test_anchor_is_in_units_of_the_hessians_scale():
    """Inputs 10x larger scale H by 100; the anchor, relative to H's mean diagonal, scales with it, so the
    re-dense lands where it did."""
    w, stats = _layer()
    config = _config(solver="closed", l1=0.0, l2=0.0, anchor=0.5)
    w1 = sds.BASES["sparsegpt"](w, stats, config)
    scaled = Hessian(32, "cpu")
    scaled.H, scaled.tokens = stats.H * 100, stats.tokens
    ours, theirs = (sds.redense(w1, least_squares.Objective(w, s), config) for s in (stats, scaled))
    assert float((ours - w1).norm()) > 1e-2 * float(w1.norm())  # the anchor does not pin it to W1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_dense_teacher_needs_dense_stream():
    w, stats = _layer()
    with pytest.raises(ValueError, match="dense stream"):
        least_squares.Objective(w, stats, "dense")


def test_dense_teacher_through_the_pipeline():
    """Layer 0 sees the same inputs on both streams, so its steps equal the sd teacher's; later layers
    differ, since their dense-stream inputs come from the unpruned model."""
    runs = {}
    for teacher in ("sd", "dense"):
        model = tiny_model("llama")
        runs[teacher] = sdsengine.prune(model, _config(teacher=teacher, iters=10), tiny_tokens(), progress=False)
    first = {t: runs[t].layers[0].steps["self_attn.q_proj"] for t in runs}
    assert first["dense"]["initial"] == pytest.approx(first["sd"]["initial"], rel=1e-4)
    assert first["dense"]["chosen"] == pytest.approx(first["sd"]["chosen"], rel=1e-3)
    last = {t: runs[t].layers[-1].steps["mlp.down_proj"]["initial"] for t in runs}
    assert last["dense"] != pytest.approx(last["sd"], rel=1e-3)


@pytest.mark.parametrize("config", [SparseGPTConfig(sparsity="2:4", refit=50), SparseGPTConfig(sparsity="2:4", swaps=2)])
def test_no_exact_fit_with_fewer_calibration_tokens_than_inputs(config):
    """16 tokens for 64-wide inputs: H is singular, and the exact refit's CG wandered along directions no token
    constrains (layer errors of 1e6 and more; SmolLM2 at 2 x 64 tokens: perplexity 3.9e10). The refit and the
    swaps leave such a linear as SparseGPT pruned it; with enough tokens they change it."""
    plain = tiny_model("llama")
    sdsengine.prune(plain, SparseGPTConfig(sparsity="2:4"), tiny_tokens(1, 16), progress=False)
    model = tiny_model("llama")
    sdsengine.prune(model, config, tiny_tokens(1, 16), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    enough = tiny_model("llama")
    sdsengine.prune(enough, config, tiny_tokens(4, 64), progress=False)
    sdsengine.prune(plain := tiny_model("llama"), SparseGPTConfig(sparsity="2:4"), tiny_tokens(4, 64), progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(enough.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5"])
@pytest.mark.parametrize("base", ["sparsegpt", "wanda"])
def test_a_linear_whose_inputs_were_all_zero_is_left_to_its_base(base, sparsity):
    """H = 0 constrains nothing: the swaps' subset solves met a zero matrix (linalg.inv failed on every SDS
    N:M default run where, say, a zeroed norm weight silenced a layer's inputs)."""
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    stats = Hessian(16, "cpu")
    stats.add_batch(torch.zeros(64, 16))
    pruned = sds.prune(w, stats, SDSConfig(sparsity=sparsity, base=base))
    pruned = pruned[0] if isinstance(pruned, tuple) else pruned
    assert torch.isfinite(pruned).all()
    if sparsity != "0.5":
        assert nm_violations(pruned, *map(int, sparsity.split(":"))) == 0


def test_top_eigenvalue_of_a_huge_hessian():
    """Iterates of H's own size overflowed fp32 norms past ~1e19 (inputs of ~3e9), read as H = 0: 1.0, and
    a step 1e19 times too long that turned SDS's weights to NaN."""
    for scale in (1e-30, 1.0, 1e19, 1e30):
        assert least_squares.top_eigenvalue(torch.eye(64) * scale) == pytest.approx(1.05 * scale, rel=1e-5)
    with pytest.raises(ValueError, match="statistics hold inf or NaN"):
        least_squares.top_eigenvalue(torch.full((4, 4), float("inf")))


@pytest.mark.parametrize("sparsity", ["2:4", "0.5"])
def test_sds_with_a_massive_activation_channel_stays_finite(sparsity):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 64, generator=gen), torch.randn(256, 64, generator=gen)
    x[:, 5] *= 1e10  # H's largest entry ~1e20: finite, but its iterates' norms were not
    stats = Hessian(64, "cpu")
    stats.add_batch(x)
    pruned, info = sds.prune(w, stats, SDSConfig(sparsity=sparsity, base="sparsegpt"))
    assert torch.isfinite(pruned).all() and info["choice"] != "base", info
    if sparsity == "2:4":
        assert nm_violations(pruned, 2, 4) == 0


def test_sds_leaves_a_linear_with_fewer_calibration_tokens_than_inputs_to_its_base():
    """Its H is singular: the re-dense's penalties decide every direction no token constrains, and shrank such
    linears toward zero (a 16-expert Mixtral's rarely routed experts to 8-19% of their dense norm, its held-out
    logits' error 0.18 against SparseGPT's 0.11). As the refit does, SDS keeps the base's weights there, and says
    so; with enough tokens it re-fits."""
    few = tiny_tokens(1, 16)
    plain, model = tiny_model("llama"), tiny_model("llama")
    sdsengine.prune(plain, SparseGPTConfig(sparsity="2:4", blocksize=16, sequential="linear"), few, progress=False)
    result = sdsengine.prune(model, _config(iters=10), few, progress=False)  # SDS is true-sequential by default
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert all(info["undetermined"] and info["choice"] == "base" for info in result.layers[0].steps.values())
    enough = sdsengine.prune(tiny_model("llama"), _config(iters=10), tiny_tokens(4, 64), progress=False)
    assert not any(info.get("undetermined") for layer in enough.layers for info in layer.steps.values())
