"""Masks checkable by hand for each method, and SparseGPT against a plain, slow reference."""
import pytest
import torch

import sdsengine
from sdsengine.algorithms import magnitude, sparsegpt, wanda
from sdsengine.algorithms.stats import Hessian, InputNorms
from sdsengine.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from sdsengine.cli import build_parser
from sdsengine.masks import nm_mask, nm_violations
from tiny_models import tiny_model, tiny_tokens


def test_magnitude_by_hand():
    w = torch.tensor([[1.0, -5.0, 2.0, 0.5], [3.0, 0.1, -0.2, 4.0]])
    assert (magnitude.prune(w, None, MagnitudeConfig(sparsity="2:4")) != 0).tolist() == \
        [[False, True, True, False], [True, False, False, True]]
    # 50% over the whole layer: the four largest |w| survive
    assert (magnitude.prune(w, None, MagnitudeConfig(sparsity="0.5")) != 0).tolist() == \
        [[False, True, True, False], [True, False, False, True]]


def test_wanda_uses_activation_norms():
    w = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    stats = InputNorms(4, "cpu")
    stats.add_batch(torch.tensor([[10.0, 1.0, 1.0, 1.0]]))  # column 0 has a large input: 10 > 2
    assert (wanda.prune(w, stats, WandaConfig(sparsity="2:4")) != 0).tolist() == [[True, False, True, False]]


def test_wanda_unstructured_rows_by_hand():
    stats = InputNorms(4, "cpu")
    stats.add_batch(torch.ones(1, 4))
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    kept = wanda.prune(w, stats, WandaConfig(sparsity="0.5")) != 0
    assert kept.tolist() == [[False, False, True, True], [True, True, False, False]]


def test_statistics_hold_the_input_norms_over_batches():
    """InputNorms: ||X_j||_2 over every token; Hessian: 2/N X^T X, whose norms() are the same up to sqrt(2/N)
    (SDS's Wanda base reads them). Two batches of different sizes: the running sums must hold."""
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 9.0)
    norms, hessian = InputNorms(8, "cpu"), Hessian(8, "cpu")
    for rows in (slice(0, 10), slice(10, 30)):
        norms.add_batch(x[rows])
        hessian.add_batch(x[rows])
    torch.testing.assert_close(norms.norms(), x.norm(dim=0))
    torch.testing.assert_close(hessian.H, 2 / 30 * x.T @ x)
    torch.testing.assert_close(hessian.norms(), (2 / 30) ** 0.5 * x.norm(dim=0))


def test_sparsegpt_zeroes_inputs_never_seen():
    """A dead input (zero row and column of H) gets no weight: SparseGPT's W[:, dead] = 0, which frees the
    block's other weights from competing with it. Small live inputs: the dead one's unit diagonal (set for
    the inverse) would otherwise rank its weights above theirs."""
    x = 0.1 * torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    x[:, 3] = 0
    stats = Hessian(8, "cpu")
    stats.add_batch(x)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for sparsity in ("0.25", "2:4"):
        pruned = sparsegpt.prune(w, stats, SparseGPTConfig(sparsity=sparsity, blocksize=8))
        assert torch.equal(pruned[:, 3], torch.zeros(4)), sparsity


def test_sparsegpt_identity_hessian_is_magnitude():
    """With H = I the OBS update is zero and the score is w^2: SparseGPT reduces to magnitude."""
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    stats = Hessian(16, "cpu")
    stats.H = torch.eye(16)
    pruned = sparsegpt.prune(w, stats, SparseGPTConfig(sparsity="2:4", blocksize=8, percdamp=0.0))
    assert torch.equal(pruned != 0, nm_mask(w.abs(), 2, 4))
    torch.testing.assert_close(pruned, w * nm_mask(w.abs(), 2, 4))


def test_sparsegpt_compensates_on_correlated_inputs():
    """Two identical input channels: pruning one moves its weight onto the other, with no output error."""
    x = torch.randn(64, 1)
    X = torch.cat([x, x, torch.randn(64, 2)], dim=1)
    stats = Hessian(4, "cpu")
    stats.add_batch(X)
    w = torch.tensor([[1.0, 0.9, 0.01, 0.02]])
    pruned = sparsegpt.prune(w, stats, SparseGPTConfig(sparsity="2:4", blocksize=4, percdamp=1e-6))
    assert nm_violations(pruned, 2, 4) == 0
    assert pruned[0, 0] == 0 or pruned[0, 1] == 0
    torch.testing.assert_close(X[:, :2] @ pruned[0, :2], X[:, :2] @ w[0, :2], atol=1e-3, rtol=1e-3)


def test_sparsegpt_damping_retries_from_the_original_diagonal():
    """A singular H is retried with more damping, each try on H + damp I (not on the last try's dampened
    diagonal), and the caller's H is left as it was (the factor dampens a copy in place)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3) @ torch.randn(3, 32) * 3.0  # rank 3: undampened Cholesky fails
    H = 2 / 64 * x.T @ x
    before = H.clone()
    factor = sparsegpt.inverse_hessian_factor(H, 0.0)
    assert torch.equal(H, before)
    for damp in [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]:  # the retries' schedule from percdamp = 0
        L, info = torch.linalg.cholesky_ex(H + damp * torch.eye(32))
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                break
    assert damp >= 1e-5  # more than one retry
    assert torch.equal(factor, U)


@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_sparsegpt_refit_keeps_the_mask_and_lowers_the_error(pattern):
    """--refit: SparseGPT's mask exactly, its kept weights refitted; the report holds both errors."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    stats = Hessian(32, "cpu")
    stats.add_batch(torch.randn(256, 8, generator=g) @ torch.randn(8, 32, generator=g) + 0.1 * torch.randn(256, 32, generator=g))
    plain = sparsegpt.prune(w, stats, SparseGPTConfig(sparsity=pattern, blocksize=8))
    fitted, info = sparsegpt.prune(w, stats, SparseGPTConfig(sparsity=pattern, blocksize=8, refit=50))
    assert torch.equal(fitted != 0, plain != 0)
    assert info["refit"] < 0.9 * info["initial"]
    assert not torch.equal(fitted, plain)


def test_sparsegpt_refit_through_the_pipeline_and_cli():
    """`--method sparsegpt --refit N` reaches the config, and every linear's report holds both errors."""
    args = build_parser().parse_args(["prune", "--method", "sparsegpt", "--sparsity", "2:4", "--refit", "7", "--out", "x"])
    assert args.refit == 7
    result = sdsengine.prune(tiny_model("llama"), SparseGPTConfig(sparsity="2:4", blocksize=16, refit=20),
                             tiny_tokens(), progress=False)
    for layer in result.layers:
        assert layer.steps and all(info["refit"] <= info["initial"] for info in layer.steps.values())


def slow_sparsegpt(w, H, sparsity, nm, blocksize, percdamp):
    """Textbook OBS, one column at a time, updating every later column immediately (no lazy batches)."""
    w = w.clone().double()
    H = H.clone().double()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    w[:, dead] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i in range(cols):
        if nm is None and i % blocksize == 0:
            blk = slice(i, min(i + blocksize, cols))
            score = w[:, blk] ** 2 / torch.diagonal(hinv)[blk] ** 2
            k = int(score.numel() * sparsity)
            order = torch.sort(score.flatten(), stable=True).indices[:k]
            block_keep = torch.ones(score.numel(), dtype=torch.bool)
            block_keep[order] = False
            keep[:, blk] = block_keep.reshape(score.shape)
        if nm is not None and i % nm[1] == 0:
            grp = slice(i, i + nm[1])
            keep[:, grp] = nm_mask(w[:, grp] ** 2 / torch.diagonal(hinv)[grp] ** 2, *nm)
        q = w[:, i] * keep[:, i]
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        w[:, i] = q
    return w.float()


@pytest.mark.parametrize("pattern,nm", [("2:4", (2, 4)), ("4:8", (4, 8)), ("0.5", None), ("0.3", None)])
@pytest.mark.parametrize("rows,cols,blocksize", [(16, 64, 16), (7, 40, 8), (5, 96, 128)])
def test_sparsegpt_matches_slow_reference(pattern, nm, rows, cols, blocksize):
    if nm and cols % nm[1]:
        pytest.skip("shape does not hold the pattern")
    torch.manual_seed(rows * cols)
    w = torch.randn(rows, cols)
    stats = Hessian(cols, "cpu")
    stats.add_batch(torch.randn(4 * cols, cols) @ torch.randn(cols, cols) * 0.3)
    cfg = SparseGPTConfig(sparsity=pattern, blocksize=blocksize, percdamp=0.01)
    fast = sparsegpt.prune(w, stats, cfg)
    slow = slow_sparsegpt(w, stats.H, cfg.sparsity.sparsity, nm, blocksize, 0.01)
    assert torch.equal(fast != 0, slow != 0)
    torch.testing.assert_close(fast, slow, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dense_stream", [False, True])
def test_statistics_say_the_bytes_they_hold(dense_stream):
    """What a prune's plan (sdsengine.plan) counts for a linear's statistics is what they hold once fed."""
    for stats_type in (InputNorms, Hessian):
        stats = stats_type(12, "cpu")
        x = torch.randn(5, 12)
        stats.add_batch(x, x + 1 if dense_stream else None)
        held = sum(t.numel() * t.element_size() for t in vars(stats).values() if torch.is_tensor(t))
        assert stats_type.nbytes(12, dense_stream) == held


def test_nm_violations_counts_across_its_chunks():
    """nm_violations counts a million groups at a time: a weight of more than one chunk counts every group."""
    weight = torch.zeros(2048, 2060)  # 1,054,720 groups of 4
    weight.view(-1, 4)[::1000] = 1.0  # 1055 groups with 4 nonzeros, the last in the second chunk
    weight.view(-1, 4)[1:1000:7, :2] = 1.0  # and groups with 2, which hold
    assert nm_violations(weight, 2, 4) == 1055 and nm_violations(weight, 3, 4) == 1055
    assert nm_violations(weight[:, :2056], 4, 4) == 0
