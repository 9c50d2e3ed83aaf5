"""SDS, Sparse-Dense-Sparse (Li et al. 2024, arXiv 2408.10473), one linear at a time from its Hessian.

    S  W1  = base(W, H)                                   SparseGPT or Wanda at the target pattern
    D  W_re = argmin_V ½ tr((V - W) H (V - W)^T) + λ1' ||V||_1 + λ2' ||V||_2^2,   started at W1
    S  W2  = base(W_re, H)
       W3  = argmin over V with the pattern of ½ tr((V - W) H (V - W)^T)    (mask re-selected by magnitude)

H = 2/N X X^T are the pipeline's Hessian statistics of this linear's inputs, which already come from the
pruned model (the paper's SD-data), so ½ tr(ΔW H ΔW^T) = (1/N) sum_t ||ΔW x_t||^2: the output error
summed over outputs, averaged over calibration tokens. The teacher (config.teacher) is W_dense on these
same inputs ("sd", the literal equation), or on the dense model's inputs ("dense": W d_t with d_t from the
pipeline's dense stream, through C = 2/N sum d x^T; see Objective). No step revisits the calibration tokens.

Choices the paper leaves open (config fields; defaults chosen by measured perplexity, docs/SDS.md):
- reduction: "element" divides the error by out_features and the penalties by the weight count (λ per
  weight, like a mean-reduced MSE), so λ1' = λ1 / in, λ2' = λ2 / in; "token" uses λ1, λ2 as they are.
- teacher: "sd" (default) or "dense", as above.
- solver: proximal gradient (soft threshold for L1) with step lr / L, L the top eigenvalue of the smooth
  part: "fista" (accelerated) or "ista"; "closed" solves the L2-only problem exactly. Starting from W1
  with a finite number of steps is itself a regularizer (the paper's "start from the pruned weights").
- adjust: projected gradient (iterative hard thresholding) on the output error, the mask re-selected by
  magnitude each step within the pattern; the best iterate is kept, so it never loses to W2.
- refit (ours): the same output error minimised exactly over the kept weights, the mask fixed (conjugate
  gradient per row). The adjustment's small steps leave most of that minimum unreached.
- swaps (ours, N:M): then each group's kept weights re-chosen and re-solved exactly, the rest of the row
  fixed, sweep after sweep, and the refit again on the new mask.
Fewer calibration tokens than inputs (a rarely routed expert of a mixture) leave H singular: the penalties then
decide every direction no token constrains and shrank such linears toward zero (a 16-expert Mixtral's rare experts
to 8-19% of their dense norm; held-out logits' error 0.18 against SparseGPT's 0.11), so SDS keeps W1 there, as the
refit does. A guard returns W1 when the SDS weight has a higher calibration error than W1. With guard "layer", W1 is
also handed to the pipeline as the linear's fallback: the decoder layer then returns to all of its W1s
when they give a lower layer output error (the per-linear errors need not add up within a layer).
"""
import sys

import torch

from sdsengine.masks import nm_mask, top_k_mask

from . import sparsegpt, wanda
from .least_squares import Objective, refine_mask, refit
from .stats import Hessian
from .timing import Laps

STATS = Hessian
BASES = {"sparsegpt": sparsegpt.obs_prune, "wanda": wanda.prune}  # the base pruners, without any refit


def variant(config):
    """The module that runs this config: SDS on BESA's masks is block-wise (sds_besa)."""
    if config.base == "besa":
        from . import sds_besa
        return sds_besa
    return sys.modules[__name__]


def needs_dense_stream(config):
    return config.teacher == "dense"


def prune(weight, stats, config):
    """(pruned weight, info): info holds the relative calibration error after each step."""
    base = _base(stats, config)
    laps = Laps(weight.device, "sds")
    w1 = laps.after("initial", base(weight.float()))
    objective = Objective(weight, stats, config.teacher, config.matmul)
    chosen, info = reconstruct(objective, w1, config, base, laps=laps)
    if config.guard == "layer":
        info["fallback"] = w1.to(weight.dtype)
    return chosen.to(weight.dtype), info


def _base(stats, config):
    """v -> the base's prune of v in fp32, for W1 and W2. SparseGPT's inverse-Hessian factor depends on H and
    the damping alone, so both prunes use one (its Cholesky pair is ~1.3 in³ flops: 31 TFLOP for a 70B
    down_proj); the second prune drops it, so it is not held through the adjustment and the refit."""
    if config.base != "sparsegpt":
        return lambda v: BASES[config.base](v, stats, config).float()
    factors = [sparsegpt.inverse_hessian_factor(stats.H, config.percdamp)] * 2
    return lambda v: sparsegpt.obs_prune(v, stats, config, factors.pop() if factors else None).float()


def reconstruct(objective, w1, config, second_prune, keep=None, laps=None):
    """The D-S-adjust steps after an initial prune w1, and the guard; second_prune(W_re) is the base's.
    keep: the mask whose counts the adjustment and the refit hold (default: W1's nonzeros, the pattern's
    counts; W2 may hold fewer where the re-dense's L1 zeroed weights, and the refit fills those back, the
    empty slots ranked by benefit: refit_support). laps: the Laps that timed the initial prune, if any; the
    info's "seconds" holds each step's time."""
    error = objective.error
    laps = Laps(w1.device, "sds") if laps is None else laps
    if not objective.determined:  # as refit: re-fits on a singular H fit the few tokens and shrink the rest
        return w1, {"initial": error(w1), "chosen": error(w1), "choice": "base", "undetermined": True,
                    "seconds": dict(laps)}
    keep = w1 != 0 if keep is None else keep
    w_re = laps.after("redense", redense(w1, objective, config))
    w2 = laps.after("second", second_prune(w_re))
    w3 = laps.after("adjust", adjust(w2, objective, config, keep) if config.adjust == "on" else w2)
    steps = {"initial": error(w1), "redense": error(w_re), "second": error(w2), "adjust": error(w3)}
    laps.after("errors", None)
    if config.refit:
        support = refit_support(w3, objective, _projector(keep, config))
        w3 = laps.after("refit", refit(w3, objective, config.refit, support=support))
        steps["refit"] = error(w3)
    if config.swaps:  # w3 holds the N:M pattern here: the adjustment's iterates and W2 all do
        w3 = laps.after("swaps", refine_mask(w3, objective, config.sparsity.nm, config.swaps, config.refit))
        steps["swaps"] = error(w3)
    final = list(steps.values())[-1]  # the last step's error: w3's
    chosen, choice = (w3, "sds") if final <= steps["initial"] else (w1, "base")
    return chosen, {**steps, "chosen": error(chosen), "choice": choice, "seconds": dict(laps)}


def refit_support(w, objective, project):
    """The mask the refit solves on: W's nonzeros, and, where W holds fewer than the pattern's counts (the
    re-dense's L1 zeroed weights and the adjustment kept W2), the empty slots whose freeing alone lowers the
    error most: g_j² / (2 H_jj), the gain of a Newton step on that one weight. Ranking the empty slots by
    |W| = 0 would fill them by position."""
    gain = objective.grad(w).square() / (2 * torch.diagonal(objective.H).clamp_min(1e-12))
    return project(torch.where(w != 0, torch.inf, gain))


def penalties(config, in_features):
    """(λ1', λ2') on the scale of ½ tr(ΔW H ΔW^T), per the config's loss reduction."""
    scale = 1.0 / in_features if config.reduction == "element" else 1.0
    return config.l1 * scale, config.l2 * scale


def redense(w1, objective, config):
    """The D step: every entry trainable, started at the pruned weights."""
    l1, l2 = penalties(config, w1.shape[1])
    if config.solver == "closed":
        return _ridge(objective, w1, l2, anchor_weight(objective, config))
    return _proximal_gradient(w1, objective, l1, l2, config)


CLOSED_RIDGE = 1e-6  # of H's mean diagonal: keeps a singular H solvable, far below any L2 weight in use


def _ridge(objective, w1, l2, a):
    """argmin ½ tr(V H V^T) - tr(B V^T) + l2 ||V||^2 + a ||V - W1||^2  =  (B + 2a W1) (H + 2 (l2 + a) I)^-1."""
    H = objective.H
    reg = 2 * (l2 + a) + CLOSED_RIDGE * float(torch.diagonal(H).mean())
    A = H + reg * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    return torch.linalg.solve(A, (objective.B + 2 * a * w1).T).T


def anchor_weight(objective, config):
    """The anchor's a in a ||V - V0||^2: config.anchor in units of H's mean diagonal."""
    return config.anchor * float(torch.diagonal(objective.H).mean()) if config.anchor else 0.0


def _proximal_gradient(w1, objective, l1, l2, config):
    """ISTA/FISTA: gradient V H - B + 2 l2 V + 2 a (V - W1), soft threshold for l1, step lr / L. Each
    iteration is one product and five elementwise passes (in place where it can), where the plain expressions
    made about sixteen: on the CPU, 100 iterations on a 1536 x 576 linear took 0.67-0.78 s against 0.81-1.20
    (the 100 products alone: 0.53-0.67 s)."""
    a = anchor_weight(objective, config)
    step = config.lr / (objective.top_eigenvalue + 2 * l2 + 2 * a)
    x = y = w1
    t = 1.0
    for _ in range(config.iters):
        grad = objective.grad(y).add_(y, alpha=2 * l2)
        if a:
            grad.add_(y - w1, alpha=2 * a)
        x_next = _soft_threshold(torch.add(y, grad, alpha=-step, out=grad), step * l1)
        if config.solver == "fista":
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            y = torch.lerp(x, x_next, 1 + (t - 1) / t_next)  # x_next + (t - 1) / t_next (x_next - x)
            t = t_next
        else:
            y = x_next
        x = x_next
    return x


def _soft_threshold(v, threshold):
    """sign(v) (|v| - threshold)+, in place: v minus v clipped to the threshold."""
    return v.sub_(v.clamp(-threshold, threshold)) if threshold > 0 else v


def adjust(w2, objective, config, keep):
    """Projected gradient toward the teacher's output, the mask re-selected by magnitude each step with the
    counts of `keep`; the best iterate (W2 included) wins, so the result never has a higher calibration
    error than W2. On the CPU at SmolLM2's shapes a step is mostly its product with H (576 x 576, 100 steps:
    0.30 s, the products 0.19, the projections 0.05)."""
    project = _projector(keep, config)
    a = anchor_weight(objective, config)
    step = config.lr / (objective.top_eigenvalue + 2 * a)
    x, best, best_loss = w2, w2, float("inf")
    for i in range(config.iters + 1):
        grad = objective.grad(x)
        loss = float((grad - objective.B).mul_(x).sum())  # the error up to a constant, from the gradient's product
        if loss < best_loss:
            best, best_loss = x, loss
        if i == config.iters:
            break
        if a:
            grad.add_(x - w2, alpha=2 * a)
        z = torch.add(x, grad, alpha=-step, out=grad)  # fused, in place: the step costs 2 passes, not 6
        x = torch.where(project(z), z, 0)  # not z * mask: a NaN or inf dropped would stay as NaN
    return best


def _projector(keep, config):
    """z -> keep mask of the pattern by |z|: N:M per group; unstructured with the base's counts (per row
    for Wanda and BESA, per layer for SparseGPT), taken from `keep` (reconstruct: W1's nonzeros, or BESA's
    mask), so the sparsity is the pattern's."""
    pattern = config.sparsity
    if pattern.nm:
        return lambda z: nm_mask(z.abs(), *pattern.nm)
    if config.base in ("wanda", "besa"):  # their counts are per row
        counts = keep.sum(dim=1)
        return lambda z: top_k_mask(z.abs(), counts)
    total = keep.sum().reshape(1)
    return lambda z: top_k_mask(z.abs().reshape(1, -1), total).reshape(z.shape)
