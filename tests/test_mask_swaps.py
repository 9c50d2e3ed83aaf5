"""--swaps: N:M mask refinement by exact group coordinate descent (least_squares.group_swaps), alone, after
SparseGPT and inside SDS; the pattern always holds and the calibration error never rises."""
import itertools

import pytest
import torch

import sdsengine
from sdsengine.algorithms import least_squares, sds, sparsegpt
from sdsengine.algorithms.stats import Hessian
from sdsengine.cli import build_parser
from sdsengine.config import SDSConfig, SparseGPTConfig
from sdsengine.masks import nm_mask, nm_violations
from sdsengine.pipeline import adapters
from tiny_models import correlated_layer, tiny_model, tiny_tokens


def _layer(out=12, inp=32):
    """Inputs mixed strongly enough that the choice of mask matters."""
    return correlated_layer(out, inp, mixing=0.5)


def _best_by_brute_force(w, H, n, m):
    """One group per row: every N-subset solved exactly in float64, the lowest error kept."""
    H, best = H.double(), torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        target = w[r].double() @ H
        candidates = []
        for s in itertools.combinations(range(m), n):
            s = list(s)
            v = torch.zeros(m, dtype=torch.float64)
            v[s] = torch.linalg.solve(H[s][:, s], target[s])
            candidates.append((float((v - w[r]) @ H @ (v - w[r])), v))
        best[r] = min(candidates, key=lambda c: c[0])[1]
    return best


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_one_group_gets_its_best_subset(nm):
    """With a single group per row, one sweep is the exact search over all N-subsets."""
    n, m = nm
    w, stats = _layer(out=10, inp=m)
    objective = least_squares.Objective(w, stats)
    start = w * nm_mask(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)), n, m)
    swapped = least_squares.group_swaps(start, objective, nm, sweeps=1, damp=0.0)
    torch.testing.assert_close(swapped.double(), _best_by_brute_force(w, stats.H, n, m), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_swaps_keep_the_pattern_and_lower_the_error(nm):
    """From SparseGPT's mask, refitted: the mask moves, the pattern holds, the error falls; a second pass
    from there never raises it."""
    w, stats = _layer()
    objective = least_squares.Objective(w, stats)
    config = SparseGPTConfig(sparsity=f"{nm[0]}:{nm[1]}", blocksize=8)
    start = least_squares.refit(sparsegpt.obs_prune(w, stats, config), objective, 100)
    swapped = least_squares.refine_mask(start, objective, nm, sweeps=2, refit_iters=100)
    assert nm_violations(swapped, *nm) == 0
    assert not torch.equal(swapped != 0, start != 0)
    assert objective.error(swapped) < 0.98 * objective.error(start)
    again = least_squares.group_swaps(swapped, objective, nm, sweeps=1)
    assert objective.error(again) <= objective.error(swapped)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_deferred_updates_are_the_same_descent(nm):
    """Blocks of 16 columns (later columns caught up once per block) against a block of one group (every
    later column updated after each group): the same sweep, to rounding."""
    w, stats = _layer(out=12, inp=64)
    objective = least_squares.Objective(w, stats)
    start = w * nm_mask(w.abs(), *nm)
    every_group = least_squares.group_swaps(start, objective, nm, sweeps=2, block=nm[1])
    blocked = least_squares.group_swaps(start, objective, nm, sweeps=2, block=16)
    assert not torch.equal(every_group != 0, start != 0)
    torch.testing.assert_close(blocked, every_group, atol=1e-5, rtol=1e-5)


def test_a_group_with_an_input_never_seen_is_still_refined():
    """An input never seen makes every subset holding it singular; the ridge (damp) keeps their solves
    finite, so the group still gets its best subset (the others' least squares) instead of being skipped."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g) @ (torch.eye(4) + 0.5 * torch.randn(4, 4, generator=g))
    x[:, 0] = 0
    stats = Hessian(4, "cpu")
    stats.add_batch(x)
    w = torch.randn(10, 4, generator=g)
    objective = least_squares.Objective(w, stats)
    start = w * torch.tensor([True, True, False, False])  # keeps the dead input
    swapped = least_squares.group_swaps(start, objective, (2, 4), sweeps=1)
    live = torch.tensor([1, 2, 3])
    best = min(objective.error(least_squares.refit(w * torch.isin(torch.arange(4), torch.tensor(s)), objective, 50))
               for s in itertools.combinations(live.tolist(), 2))
    assert torch.isfinite(swapped).all()
    assert objective.error(swapped) <= best * (1 + 1e-3) < objective.error(start)


def test_swaps_refuse_a_weight_outside_the_pattern():
    w, stats = _layer()
    with pytest.raises(ValueError, match="2:4"):
        least_squares.group_swaps(w, least_squares.Objective(w, stats), (2, 4), sweeps=1)


def test_swaps_need_an_nm_pattern():
    with pytest.raises(ValueError, match="not N:M"):
        SDSConfig(sparsity="0.5", swaps=1)
    with pytest.raises(ValueError, match="sweeps"):
        SparseGPTConfig(sparsity="2:4", swaps=-1)
    assert build_parser().parse_args(["prune", "--method", "sds", "--swaps", "2", "--out", "x"]).swaps == 2


def test_one_sweep_is_sds_default_where_measured():
    """Measured (docs/SDS.md, Mask refinement; docs/BESA.md): on for N:M SDS on every base; other patterns and
    SparseGPT itself keep 0; an explicit value wins."""
    assert SDSConfig(sparsity="2:4").swaps == SDSConfig(sparsity="4:8").swaps == 1
    assert SDSConfig(sparsity="2:4", base="wanda").swaps == SDSConfig(sparsity="4:8", base="wanda").swaps == 1
    assert SDSConfig(sparsity="0.5", base="wanda").swaps == SDSConfig(sparsity="0.5").swaps == 0
    assert SDSConfig(sparsity="2:4", base="besa").swaps == SDSConfig(sparsity="4:8", base="besa").swaps == 1
    assert SDSConfig(sparsity="0.5", base="besa").swaps == SparseGPTConfig(sparsity="2:4").swaps == 0
    assert SDSConfig(sparsity="2:4", swaps=0).swaps == 0 and SDSConfig(sparsity="2:4").to_dict()["swaps"] == 1


def test_sparsegpt_and_sds_report_the_swaps_step():
    w, stats = _layer()
    _, info = sparsegpt.prune(w, stats, SparseGPTConfig(sparsity="2:4", blocksize=8, refit=50, swaps=1))
    assert info["swaps"] < info["refit"] < info["initial"]
    pruned, info = sds.prune(w, stats, SDSConfig(sparsity="2:4", blocksize=8, swaps=1))
    assert nm_violations(pruned, 2, 4) == 0
    assert info["swaps"] <= info["refit"] and info["chosen"] == info["swaps"]


def test_sds_with_swaps_through_the_pipeline():
    model = tiny_model("llama")
    result = sdsengine.prune(model, SDSConfig(sparsity="2:4", blocksize=16, iters=10, swaps=1), tiny_tokens(),
                             progress=False)
    for layer, steps in zip(model.model.layers, (r.steps for r in result.layers)):
        for name, module in adapters.linear_modules(layer).items():
            assert steps[name]["swaps"] <= steps[name]["refit"], name
            assert nm_violations(adapters.get_weight(module), 2, 4) == 0, name
