"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): OBS pruning with lazy block updates.

For a layer with Hessian H = 2 X X^T, removing w_q and updating the rest by -w_q / [H^-1]_qq * H^-1_{:,q}
minimizes the output error; masks are chosen by w^2 / [H^-1]_qq^2 per block (unstructured) or per
group of M (N:M). The per-column work of each block runs in sdsengine.kernels.sparsegpt_block; the
update of the columns after the block is one matrix product.

With config.refit > 0 (ours), the kept weights are then refitted exactly on SparseGPT's mask: each row's
least squares over its kept weights (least_squares.refit). SparseGPT's updates compensate each pruned
weight once, in column order, and never revisit earlier columns; the refit solves the same objective
outright. With config.swaps > 0 (ours, N:M only), the mask is then refined group by group and refitted
(least_squares.refine_mask).
"""
import torch

from sdsengine import kernels

from .least_squares import Objective, refine_mask, refit
from .stats import Hessian

STATS = Hessian


def prune(weight, stats, config):
    """The method: SparseGPT, then the refit and the mask refinement if asked (the errors after each go into
    the report)."""
    pruned = obs_prune(weight, stats, config)
    if not (config.refit or config.swaps):
        return pruned
    objective = Objective(weight, stats)
    fitted = pruned.float()
    info = {"initial": objective.error(fitted)}
    if config.refit:
        fitted = refit(fitted, objective, config.refit)
        info["refit"] = objective.error(fitted)
    if config.swaps:
        fitted = refine_mask(fitted, objective, config.sparsity.nm, config.swaps, config.refit)
        info["swaps"] = objective.error(fitted)
    return fitted.to(weight.dtype), info


def obs_prune(weight, stats, config, factor=None):
    """SparseGPT itself (also SDS's base): OBS pruning block by block. Inputs never seen (dead) are zeroed.
    factor: inverse_hessian_factor(stats.H, config.percdamp) where the caller already has it (SDS)."""
    w = weight.to(torch.float32, copy=True)  # one copy (.float().clone() made two of a bf16 weight)
    w[:, torch.diagonal(stats.H) == 0] = 0
    hinv = inverse_hessian_factor(stats.H, config.percdamp) if factor is None else factor
    pattern, cols = config.sparsity, w.shape[1]
    for start in range(0, cols, config.blocksize):
        end = min(start + config.blocksize, cols)
        q, err, _ = kernels.sparsegpt_block(w[:, start:end], hinv[start:end, start:end], pattern.sparsity, pattern.nm)
        w[:, start:end] = q
        w[:, end:] -= err @ hinv[start:end, end:]
    return w.to(weight.dtype)


def inverse_hessian_factor(H, percdamp):
    """Upper Cholesky factor of (H + damp I)^-1, dead inputs' zero diagonal set to 1; H is left as it is.
    At most 3 in² beyond H (a 70B down_proj's is 3.3 GB): the dampened copy, its factor and the inverse."""
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.diagonal(H).mean()
    diagonal = torch.diagonal(H).clone()
    for _ in range(6):  # retry with more damping if H is numerically not positive definite
        torch.diagonal(H).copy_(diagonal + damp)  # H + damp I in place; a retry dampens the original diagonal
        try:
            return _factor_of_inverse(H)
        except torch.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-6
    raise RuntimeError("SparseGPT: the Hessian stayed singular after dampening; check the calibration data")


def _factor_of_inverse(A):
    """Upper Cholesky factor of A^-1. A function of its own so that a failed try frees its factors."""
    L = torch.linalg.cholesky(A)
    inverse = torch.cholesky_inverse(L)
    del L  # freed before the second factorization
    return torch.linalg.cholesky(inverse, upper=True)
