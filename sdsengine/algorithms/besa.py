"""BESA (Xu et al., ICLR 2024, arXiv 2402.16880): blockwise parameter-efficient sparsity allocation.

Weights are never updated. Inside each row r of a linear, weights are ranked once by Wanda's score
|W_rj|·‖X_j‖ (ascending: rank_r(j)); what is learned is how many to drop per row (mode row) or per
linear (mode layer), under the block-output loss:

    p_d = d / K (d = 0..K),   β_r = softmax(σ(θ_r)),   α_r = Σ_d β_rd p_d        (θ = 0: α = 0.5)
    forward   M_rj = [rank_r(j) ≥ ⌊C α_r⌋]
    backward  P_rj = Σ_{d: ⌊C p_d⌋ ≤ rank_r(j)} β_rd,   M = M_hard − sg(P) + P,   W' = sg(W) ⊙ M
    loss = mean_c ‖y_c − t_c‖² / E_c  +  λ ((S − s*) / s*)²,    S = Σ_r C_r α_r / Σ_r C_r

t is the dense block on the same (already pruned upstream) inputs, or with target 'dense_model' the dense
model's output of this block (the pipeline's dense stream); E_c the energy of its channel c. The
constraint is per block: rows and linears inside it are free. Afterwards the counts are projected so the
block's counted zeros equal round(s*·N) (project_counts). N:M patterns learn which N to keep (besa_nm).

The guard (ours, config.guard 'layer'): the masks learning starts from (Wanda's; unstructured: Wanda's
ranking at s* in every row, projected to the block's count) go to the pipeline as each linear's fallback,
and a decoder layer whose output error they make lower keeps them. The STE surrogate does not always
lower the hard-mask loss: at 2:4 on 128 calibration windows the block loss rose in every block of
SmolLM2-135M (docs/BESA.md).
"""
import base64

import numpy as np
import torch

from sdsengine.pipeline import adapters

from . import besa_nm
from .besa_block import learn, loss_summary, masked_weight
from .stats import InputNorms
from .timing import Laps

STATS = InputNorms


def needs_dense_stream(config):
    return config.target == "dense_model"


def prune_layer(ctx, config):
    """Learn the block's masks, apply them to ctx.targets in place; returns {linear: info, '_block': info}."""
    laps = Laps(ctx.device, "besa")  # the report's seconds per phase: setup, steps, checks, apply
    learner = laps.after("setup", (besa_nm.SelectionLearner if config.sparsity.nm else RateLearner)(ctx, config))
    # Only N:M compares iterates: its count is fixed, while an unstructured iterate's hard mask is not yet
    # projected onto the block's count, so its loss is not comparable.
    losses, checked = learn(ctx, learner, config, checks=config.nm_checks if config.sparsity.nm else 0, laps=laps)
    with torch.no_grad():
        starts = learner.start() if config.guard == "layer" else {}  # after learning: no copy held through it
        info = laps.after("apply", learner.apply())
        info["_block"] = {**loss_summary(losses), **checked, **learner.block_info(), "seconds": dict(laps)}
    for name, (weight, summary) in starts.items():
        # the layer guard may keep these instead; the report then describes them (fallback_info)
        info[name].update(fallback=weight, fallback_info=summary)
    return info


def wanda_ranks(weight, norms):
    """rank_r(j): position of j in row r sorted by ascending Wanda score, ties by lower index first, so
    that [rank < k] is exactly the mask Wanda drops at k zeros per row (masks.prune_lowest_mask)."""
    scores = weight.abs().float() * norms.float().reshape(1, -1)
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty(order.shape, dtype=torch.int32, device=order.device)
    positions = torch.arange(order.shape[1], dtype=torch.int32, device=order.device)
    return ranks.scatter_(1, order, positions.expand_as(order).contiguous())


def initial_logits(target, candidates, sigmoid, dtype=torch.float32):
    """Logits whose α equals the target: zeros at 0.5 (the reference start), else tilted toward the
    target so learning starts from the Wanda allocation at s* instead of at 0.5."""
    p = torch.arange(candidates + 1, dtype=torch.float64) / candidates
    if abs(target - 0.5) < 1e-12:
        return torch.zeros(candidates + 1, dtype=dtype)
    lo, hi = -200.0, 200.0
    for _ in range(100):  # α(c·(p − ½)) increases with c
        c = (lo + hi) / 2
        lo, hi = (c, hi) if float(_alpha(c * (p - 0.5), p, sigmoid)) < target else (lo, c)
    return ((lo + hi) / 2 * (p - 0.5)).to(dtype)


def _alpha(theta, p, sigmoid):
    beta = torch.softmax(torch.sigmoid(theta) if sigmoid else theta, dim=-1)
    return beta @ p.to(beta.dtype)


class RowRates:
    """One linear's rate logits (rows × (K+1), or 1 × (K+1) in layer mode) over its fixed Wanda ranking."""

    def __init__(self, weight, norms, config, theta0):
        self.rows, self.cols = weight.shape
        self.rank = wanda_ranks(weight, norms).long()  # gather's index type once (not an 8 B/weight copy a step)
        k = config.candidates
        device = weight.device
        self.p = (torch.arange(k + 1, device=device) / k).to(theta0.dtype)
        thresholds = (self.cols * torch.arange(k + 1, device=device)) // k  # ⌊C p_d⌋ in integers: exact
        # P(q) sums β over the candidates whose threshold is <= q: a prefix of the ascending candidates
        self.last = torch.searchsorted(thresholds, torch.arange(self.cols, device=device), right=True) - 1
        shared = 1 if config.mode == "layer" else self.rows
        self.theta = torch.nn.Parameter(theta0.to(device).expand(shared, -1).clone())
        self.sigmoid = config.sigmoid

    def beta(self, theta=None):
        theta = self.theta if theta is None else theta
        return torch.softmax(torch.sigmoid(theta) if self.sigmoid else theta, dim=-1)

    def alpha(self, beta=None):
        return (self.beta() if beta is None else beta) @ self.p.to(self.theta.dtype)

    def keep_prob(self, beta):
        by_rank = beta.cumsum(dim=-1)[:, self.last].expand(self.rows, -1)
        return by_rank.gather(1, self.rank)

    def hard(self, alpha):
        zeros = torch.floor(self.cols * alpha.detach()).clamp(0, self.cols)
        return self.rank >= zeros.long().reshape(-1, 1)

    def mask(self, kind):
        """'hard' (the STE's forward) or 'soft' (the relaxed objective)."""
        beta = self.beta()
        return self.hard(self.alpha(beta)) if kind == "hard" else self.keep_prob(beta)

    def hard_and_soft(self):
        """(hard mask, soft keep probabilities): the STE's forward and its gradient's path."""
        beta = self.beta()
        return self.hard(self.alpha(beta)), self.keep_prob(beta)

    def row_alpha(self):
        """Learned row sparsity in float64 (what the final projection starts from)."""
        beta = self.beta(self.theta.detach().double())
        return (beta @ self.p.double()).expand(self.rows)


class RateLearner:
    """The unstructured learner: row (or layer) rates for every targeted linear of one block."""

    def __init__(self, ctx, config):
        self.targets = ctx.targets
        self.target = config.sparsity.sparsity
        self.penalty_weight = config.penalty
        weights = {name: adapters.get_weight(m) for name, m in ctx.targets.items()}
        dtype = torch.promote_types(next(iter(weights.values())).dtype, torch.float32)
        theta0 = initial_logits(self.target, config.candidates, config.sigmoid, dtype)
        self.rates = {name: RowRates(w, ctx.stats[name].norms(), config, theta0) for name, w in weights.items()}
        self.total = sum(w.numel() for w in weights.values())

    def parameters(self):
        return [r.theta for r in self.rates.values()]

    def masked_weights(self, kind="ste"):
        return {name: masked_weight(adapters.get_weight(self.targets[name]), r, kind)
                for name, r in self.rates.items()}

    def expected_sparsity(self):
        zeros = sum(r.cols * r.alpha().sum() * (r.rows // r.theta.shape[0]) for r in self.rates.values())
        return zeros / self.total

    def penalty(self):
        return self.penalty_weight * ((self.expected_sparsity() - self.target) / self.target) ** 2

    def apply(self):
        """Project the learned rates onto exactly round(s*·N) zeros in the block, then mask the weights."""
        info, self.counted_zeros = {}, 0
        for name, (keep, zeros) in self._projected(torch.cat([r.row_alpha() for r in self.rates.values()])).items():
            adapters.set_weight(self.targets[name], adapters.get_weight(self.targets[name]) * keep)
            self.counted_zeros += int((adapters.get_weight(self.targets[name]) == 0).sum())
            info[name] = row_summary(zeros, self.rates[name].cols)
        return info

    def start(self):
        """{name: (masked weight, its summary)} where learning starts: every row at the target rate, projected
        the same way."""
        alpha = torch.cat([torch.full((r.rows,), self.target, dtype=torch.float64, device=r.rank.device)
                           for r in self.rates.values()])
        return {name: (adapters.get_weight(self.targets[name]) * keep, row_summary(zeros, self.rates[name].cols))
                for name, (keep, zeros) in self._projected(alpha).items()}

    def _projected(self, alpha):
        """{name: (keep mask, zeros per row)} with exactly round(s*·N) zeros in the block, rows near cols·α."""
        cols = torch.cat([torch.full((r.rows,), r.cols, dtype=torch.float64, device=alpha.device)
                          for r in self.rates.values()])
        counts = project_counts(alpha, cols, round(self.target * self.total)).split(
            [r.rows for r in self.rates.values()])
        return {name: (r.rank >= zeros.long().reshape(-1, 1), zeros)
                for (name, r), zeros in zip(self.rates.items(), counts)}

    def block_info(self):
        return {"expected_sparsity": float(self.expected_sparsity()), "target": self.target,
                "counted_sparsity": self.counted_zeros / self.total}


def project_counts(alpha, cols, target_zeros):
    """Zeros per row summing to exactly target_zeros, closest to cols·(α + δ) for one shift δ: the learned
    allocation moves as a whole (bisection on δ), then rounds by largest remainders (ties: lower row)."""
    alpha, cols = alpha.double(), cols.double()

    def spread(delta):
        return torch.minimum(torch.clamp(cols * (alpha + delta), min=0), cols)

    lo, hi = -1.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(spread(mid).sum()) < target_zeros else (lo, mid)
    x = spread(hi)
    counts = torch.floor(x + 1e-9)  # x a hair below an integer (float noise) is that integer
    frac = torch.round((x - counts).clamp_min(0) * 1e9)  # remainders equal up to float noise tie exactly
    return _round_remainder(counts, frac, cols, target_zeros - int(counts.sum())).long()


def _round_remainder(counts, frac, cols, rest):
    """Add one zero to the `rest` rows with the largest remainders (remove from the smallest if rest < 0)."""
    if rest > 0:
        order = torch.sort(torch.where(counts < cols, frac, -1.0), descending=True, stable=True).indices
        counts[order[:rest]] += 1
    elif rest < 0:
        order = torch.sort(torch.where(counts > 0, frac, 2e9), stable=True).indices
        counts[order[:-rest]] -= 1
    return counts


def row_summary(zeros, cols):
    """Per-row allocation for the report: summary numbers, a 10-bin histogram and every row's zero count
    (base64 of little-endian uint16/uint32, decoded by besa_plot.row_sparsity)."""
    sparsity = zeros.double() / cols
    dtype = np.uint16 if cols < 2 ** 16 else np.uint32
    packed = zeros.cpu().numpy().astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return {"in_features": cols, "row_sparsity_mean": float(sparsity.mean()),
            "row_sparsity_min": float(sparsity.min()), "row_sparsity_max": float(sparsity.max()),
            "row_sparsity_hist10": torch.histc(sparsity.float(), bins=10, min=0, max=1).long().tolist(),
            "row_zeros_dtype": np.dtype(dtype).name, "row_zeros_b64": base64.b64encode(packed).decode()}
