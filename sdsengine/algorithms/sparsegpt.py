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


def obs_prune(weight, stats, config):
    """SparseGPT itself (also SDS's base): OBS pruning block by block."""
    w = weight.float().clone()
    hinv = _inverse_hessian_factor(stats.H.clone(), w, config.percdamp)
    pattern, cols = config.sparsity, w.shape[1]
    for start in range(0, cols, config.blocksize):
        end = min(start + config.blocksize, cols)
        q, err, _ = kernels.sparsegpt_block(w[:, start:end], hinv[start:end, start:end], pattern.sparsity, pattern.nm)
        w[:, start:end] = q
        w[:, end:] -= err @ hinv[start:end, end:]
    return w.to(weight.dtype)


def _inverse_hessian_factor(H, w, percdamp):
    """Upper Cholesky factor of (H + damp I)^-1; inputs never seen (dead) are zeroed in w."""
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.diagonal(H).mean()
    for _ in range(6):  # retry with more damping if H is numerically not positive definite
        try:
            L = torch.linalg.cholesky(H + damp * torch.eye(H.shape[0], device=H.device))
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-6
    raise RuntimeError("SparseGPT: the Hessian stayed singular after dampening; check the calibration data")
