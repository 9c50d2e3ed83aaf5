"""The calibration output error of a linear as a quadratic in its weight, and its exact minimiser on a
fixed mask (the refit that SparseGPT's --refit and SDS share), and an N:M mask refinement that moves the mask
itself (--swaps).

With H = 2/N sum x x^T over the linear's calibration inputs, ½ tr(ΔW H ΔW^T) is the squared output error
averaged over tokens: every step below works from H (and C, T for a teacher on other inputs), never from
the tokens.
"""
import contextlib
import itertools
import math

import torch

from sdsengine.config import MATMUL


class Objective:
    """The calibration output error of V against the teacher W, from statistics:

        ½ · 2/N · sum_t ||W d_t - V x_t||^2  =  ½ tr(V H V^T) - tr(B V^T) + ½ tr(W T W^T),   B = W C

    x: this linear's inputs in the pruned model (H); d: the teacher's inputs, the same x ("sd": C = T = H)
    or the dense model's (C, T from the dense stream). error() is relative to the teacher's output energy.
    matmul: the precision of the re-dense and adjustment iterations' products with H (grad, product): "fp32", or
    "tf32" (10-bit mantissas in, fp32 sums: on CUDA the tensor cores', elsewhere emulated by rounding both operands
    to nearest, so a CPU run shows errors of the size a GPU run gets). error(), exact_grad() and exact_product()
    (the refit's and the swaps') are fp32 either way.
    """

    def __init__(self, weight, stats, teacher="sd", matmul="fp32"):
        if matmul not in MATMUL:
            raise ValueError(f"matmul must be one of {', '.join(MATMUL)}, got {matmul!r}")
        self.matmul = matmul
        self.w, self.H = weight.float(), stats.H.float()
        self.dense = teacher == "dense"
        if self.dense and stats.C is None:
            raise ValueError("the dense teacher needs the dense stream's statistics (Hessian.C, T): run SDS "
                             "through the pipeline with teacher='dense'")
        C, T = (stats.C.float(), stats.T.float()) if self.dense else (self.H, self.H)
        self.B = self.w @ C
        # tr(W T W^T); with the "sd" teacher W T is B, the same product (2 out in² flops; 13.5 TFLOP: 70B down_proj)
        self.ref = float((self.B * self.w).sum() if T is C else quadratic(self.w, T)) or 1e-30
        # fewer calibration tokens than inputs: H is singular and exact fits are not unique (see refit); and
        # H = 0 (a linear whose inputs were all zero) constrains nothing
        self.determined = stats.tokens >= self.H.shape[0] and bool(torch.diagonal(self.H).amax() > 0)
        self._top = None
        self._H_tf32 = None

    def product(self, v):
        """v @ H in the iterations' precision (self.matmul)."""
        if self.matmul == "fp32":
            return v @ self.H
        if v.is_cuda:
            with tf32_matmul():
                return v @ self.H
        if self._H_tf32 is None:
            self._H_tf32 = tf32(self.H)
        return tf32(v) @ self._H_tf32

    def grad(self, v):
        """The gradient of the error for the iterations: product(v) - B."""
        return self.product(v) - self.B

    def exact_product(self, v):
        return v @ self.H

    def exact_grad(self, v):
        return self.exact_product(v) - self.B

    def error(self, v, grad=None):
        if not self.dense:  # the difference form: no cancellation when V is close to W
            return float(quadratic(v - self.w, self.H)) / self.ref
        g = self.exact_grad(v) if grad is None else grad
        return (float(((g - self.B).double() * v.double()).sum()) + self.ref) / self.ref

    @property
    def top_eigenvalue(self):
        if self._top is None:
            self._top = top_eigenvalue(self.H)
        return self._top


def quadratic(d, H):
    return ((d @ H) * d).sum()


def tf32(x):
    """fp32 x rounded to TF32 (10 mantissa bits), to nearest with ties away from zero as the tensor cores' cvt.rna
    rounds: the operand a TF32 product reads."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)


@contextlib.contextmanager
def tf32_matmul():
    """CUDA fp32 matrix products on the tensor cores in TF32 inside, torch's settings as they were after. Since torch
    2.9 it has two: allow_tf32 (older; setting it sets the newer along with it) and fp32_precision (which leaves the
    older as it was). Where they disagree, torch's readers of the older raise (a profiler reads it on every op), so
    TF32 goes on through allow_tf32, unless they disagreed before: then through fp32_precision, as the user did."""
    matmul = torch.backends.cuda.matmul
    newer = getattr(matmul, "fp32_precision", None)  # None before torch 2.9
    if newer == "tf32":  # on already
        yield
        return
    try:
        older = matmul.allow_tf32
    except RuntimeError:  # the two disagree already
        older = None
    if older is None:
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    try:
        yield
    finally:
        if older is not None:
            matmul.allow_tf32 = older  # which sets the newer to "ieee" where it may have been "none" (inherit)
        if newer is not None:
            matmul.fp32_precision = newer


def top_eigenvalue(H, iters=64, margin=1.05):
    """Largest eigenvalue of the PSD H by power iteration; the margin covers its underestimate. Started from
    the ones vector; where H maps that to zero though H is not zero (every token's inputs summing to zero),
    started again from a seeded random vector. 1.0 for H = 0: no data, any step is stable. Iterates on H
    scaled to a largest entry of 1: vector norms of H's own size overflow fp32 past ~1e19 (inputs of ~3e9),
    which read as H = 0 and gave a step 1e19 times too long."""
    scale = float(torch.diagonal(H).amax()) if H.numel() else 0.0  # a PSD matrix's largest entry
    if not math.isfinite(scale):
        raise ValueError("the calibration statistics hold inf or NaN: the layer's inputs overflowed")
    if scale <= 0:
        return 1.0
    top = _power_iteration(H, torch.ones(H.shape[0], device=H.device, dtype=H.dtype), iters, scale)
    if top is None:
        generator = torch.Generator(device=H.device).manual_seed(0)
        start = torch.rand(H.shape[0], generator=generator, device=H.device, dtype=H.dtype)
        top = _power_iteration(H, start, iters, scale)
    return 1.0 if top is None else top * margin


def _power_iteration(H, v, iters, scale):
    """vᵀHv after `iters` normalized products from v, or None if H maps the iterate to zero. Each product
    is of H / scale (v is divided, not H copied), so its entries stay below H's size."""
    for _ in range(iters):
        v = H @ (v / scale)
        norm = v.norm()
        if norm == 0:
            return None
        v = v / norm
    return float(v @ (H @ (v / scale))) * scale


def refit(w, objective, iters, support=None):
    """Least squares on a fixed mask: the calibration error minimised over the weights in `support` (default:
    W's nonzeros) by `iters` steps of Jacobi-preconditioned conjugate gradient (rows are independent
    problems, so every row runs its own CG in one batched product per step). The adjustment's gradient steps
    of lr/L barely move along H's low-curvature directions; CG reaches them in few steps. Returns W if that
    is better. W must be zero outside `support`.

    Returns W as well where fewer calibration tokens than inputs leave H singular: exact fits then form a
    continuum, and CG, pushed by rounding along directions no token constrains, found ones with a tiny
    calibration error that are wild elsewhere (SmolLM2 SparseGPT 2:4 at 2 x 64 tokens: WikiText-2 perplexity
    3.9e10 against 714 without the refit; 5981 with a ridge of 1% of H's mean diagonal)."""
    if not objective.determined:
        return w
    keep = ((w != 0) if support is None else support).to(w.dtype)
    inv_diag = 1.0 / torch.diagonal(objective.H).clamp_min(1e-12)
    x = w
    # fp32 products whatever objective.matmul says: CG's residual is updated, not recomputed, so each product's
    # rounding stays in it, and TF32's (~1e-3) capped how far the refit, most of SDS's gain here, got
    r = -objective.exact_grad(x) * keep
    z = r * inv_diag
    p, rz = z, (r * z).sum(dim=1, keepdim=True)
    for _ in range(iters):
        hp = objective.exact_product(p) * keep
        alpha = _safe_ratio(rz, (p * hp).sum(dim=1, keepdim=True))
        x = x + alpha * p
        r = r - alpha * hp
        z = r * inv_diag
        rz_next = (r * z).sum(dim=1, keepdim=True)
        p, rz = z + _safe_ratio(rz_next, rz) * p, rz_next
    return x if objective.error(x) <= objective.error(w) else w


def _safe_ratio(a, b):
    """a / b per row, 0 where b is 0 (a row whose search direction vanished has converged)."""
    return torch.where(b > 0, a / b.clamp_min(1e-30), torch.zeros_like(a))


SWAP_BLOCK = 128  # columns whose groups are swapped before the gradient of the later columns catches up


def group_swaps(w, objective, nm, sweeps, damp=1e-4, block=SWAP_BLOCK):
    """N:M mask refinement by exact block coordinate descent (ours): group after group of M inputs, every row
    re-chooses which N of its M weights to keep and solves them, the rest of the row fixed. A row takes a
    candidate only if it lowers the exact calibration error, so no step raises it; a sweep costs about two
    products with H. The adjustment's gradient steps and the refit move weights within a mask; this moves
    the mask itself (docs/SDS.md, "Mask refinement"). damp (a fraction of H's mean diagonal) keeps each
    subset's solve defined for inputs never seen.

    Each group's change reaches the gradient of the columns after it at once inside its block of `block`
    columns, and the columns after the block in one product per block, as SparseGPT defers its updates:
    updating every later column after each group moved 4 x rows x in^2 / (2 M) floats through memory per
    sweep (on the CPU, 8192 x 2048 at 2:4: 9.9 s, 26 products with H; deferred 3.3 s)."""
    n, m = nm
    if w.shape[1] % m or ((w.reshape(-1, m) != 0).sum(dim=1) > n).any():
        raise ValueError(f"group_swaps refines a valid {n}:{m} mask; the weight given is not one")
    if not objective.determined:  # as refit: exact choices on a singular H overfit the few tokens
        return w
    H, x = objective.H, w.clone()
    subsets = torch.tensor(list(itertools.combinations(range(m), n)), device=w.device)  # (P, N): 6 for 2:4
    H_ss, H_ss_inv = _subset_blocks(H, m, subsets, damp)
    block = max(m, block // m * m)
    for _ in range(sweeps):
        # exact, as the choices compare exact errors; recomputed each sweep so the incremental updates do not drift
        grad = objective.exact_grad(x)
        for start in range(0, w.shape[1], block):
            end = min(start + block, w.shape[1])
            before = x[:, start:end].clone()
            for first in range(start, end, m):
                group = first // m
                cols, later = slice(first, first + m), slice(first + m, end)
                H_gg, x_g = H[cols, cols], x[:, cols]
                q = grad[:, cols] - x_g @ H_gg  # each row's gradient on this group with the group zeroed
                new = _best_group(q, x_g, H_gg, subsets, H_ss[group], H_ss_inv[group])
                grad[:, later] += (new - x_g) @ H[cols, later]  # no earlier column's gradient is read again
                x[:, cols] = new
            grad[:, end:] += (x[:, start:end] - before) @ H[start:end, end:]
    return x if objective.error(x) <= objective.error(w) else w


def _subset_blocks(H, m, subsets, damp):
    """Every group's blocks of H over its N-subsets, (G, P, N, N), and their inverses with the ridge, all at
    once: H never changes, and an inverse per group would stop a GPU for the host each time."""
    starts = torch.arange(0, H.shape[0], m, device=H.device)
    index = starts[:, None, None] + subsets  # (G, P, N)
    blocks = H[index[..., :, None], index[..., None, :]]
    ridge = damp * float(torch.diagonal(H).mean()) * torch.eye(subsets.shape[1], device=H.device)
    return blocks, torch.linalg.inv_ex(blocks + ridge).inverse  # damp > 0 and H determined: each is defined


def _best_group(q, x_g, H_gg, subsets, H_ss, H_ss_inv):
    """Per row, the group's weights that minimise ½ vᵀ H_gg v + qᵀ v over the N-subsets (H_ss: H_gg's blocks
    over them, (P, N, N); H_ss_inv: their inverses with the ridge), or x_g where none is lower than x_g's
    own value."""
    q_s = q[:, subsets]  # (rows, P, N)
    u = -torch.einsum("rpi,pij->rpj", q_s, H_ss_inv)  # P inverses serve all rows
    value = 0.5 * (torch.einsum("rpi,pij->rpj", u, H_ss) * u).sum(-1) + (q_s * u).sum(-1)
    now = 0.5 * ((x_g @ H_gg) * x_g).sum(-1) + (q * x_g).sum(-1)
    best_value, best = value.min(dim=1)
    rows = torch.arange(q.shape[0], device=q.device)
    new = torch.zeros_like(q)
    new[rows[:, None], subsets[best]] = u[rows, best]
    return torch.where((best_value < now)[:, None], new, x_g)


def refine_mask(w, objective, nm, sweeps, refit_iters):
    """`sweeps` of group_swaps, then the refit on the new mask (--swaps): the swaps solve each group with
    the rest of its row fixed, the refit solves whole rows."""
    swapped = group_swaps(w, objective, nm, sweeps)
    return refit(swapped, objective, refit_iters) if refit_iters else swapped
