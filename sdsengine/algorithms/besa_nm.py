"""BESA for N:M (our extension; the paper has no N:M): learn WHICH n of every m to keep.

Under N:M there is no count to allocate, so the block loss instead learns a score. Every candidate is a
standardized log-score (per row: zero mean, unit std); the combined score is

    c_rj = z_wanda,rj + Σ_k φ_rk z_k,rj + b_j        (φ per row, or per linear in layer mode; b per input)

with z_magnitude = standardized log|W| (φ trades Wanda's activation term for magnitude, row by row) and
"channel" a free learnable log-score b_j per input channel. φ = b = 0 at the start, so c is a strictly increasing
function of the Wanda score (in float64) and the first mask, like zero steps, is exactly Wanda's N:M mask.

    forward   M = top-n of c in each group of m (masks.nm_mask: always a valid N:M mask)
    backward  P_rj = sigmoid((c_rj − τ_g) / T), τ_g midway between the n-th and (n+1)-th score of group g
              M = M_hard − sg(P) + P,   W' = sg(W) ⊙ M

SparseGPT's w²/[H⁻¹]_jj is not a candidate: STATS is InputNorms, so there is no Hessian here (it would
add to log|W| a per-column term, which the "channel" score can already learn from the block loss).
"""
import torch

from sdsengine.masks import nm_mask
from sdsengine.pipeline import adapters

from .besa_block import masked_weight


def standardized(x):
    """(x − mean) / std per row; float64 keeps a strictly increasing map of distinct float32 inputs."""
    return (x - x.mean(dim=-1, keepdim=True)) / x.std(dim=-1, keepdim=True).clamp_min(1e-12)


def log_score(score):
    """log of a non-negative score in float64; zeros sit just below the smallest positive log, so ties
    are only among exact zeros (as in Wanda's own comparison)."""
    score = score.double()
    positive = score > 0
    smallest = torch.where(positive, score, torch.inf).amin()  # log is increasing: no boolean indexing (a sync)
    floor = torch.log(smallest) - 1 if bool(positive.any()) else torch.tensor(0.0, dtype=score.dtype)
    return torch.where(positive, torch.log(score.clamp_min(1e-300)), floor.to(score.device))


class GroupSelection:
    """One linear's learnable selection score over its groups of m inputs."""

    def __init__(self, weight, norms, config, dtype):
        self.n, self.m = config.sparsity.nm
        self.temperature = config.nm_temperature
        wanda = weight.abs().float() * norms.float().reshape(1, -1)  # Wanda's own float32 product
        self.base = standardized(log_score(wanda))
        rows, cols = weight.shape
        self.extra = [standardized(log_score(weight.abs())).to(dtype)] if "magnitude" in config.nm_score_list else []
        shared = 1 if config.mode == "layer" else rows
        self.phi = torch.nn.Parameter(torch.zeros(shared, len(self.extra), dtype=dtype, device=weight.device))
        self.bias = (torch.nn.Parameter(torch.zeros(1, cols, dtype=dtype, device=weight.device))
                     if "channel" in config.nm_score_list else None)
        self.wanda_mask = nm_mask(wanda, self.n, self.m)

    def parameters(self):
        return [self.phi] + ([self.bias] if self.bias is not None else [])

    def score(self):
        c = self.base
        for k, z in enumerate(self.extra):
            c = c + self.phi[:, k:k + 1] * z
        return c + self.bias if self.bias is not None else c

    def keep_prob(self, c):
        """sigmoid((c - τ) / T), τ midway between each group's n-th and (n+1)-th score. From a sort of each group,
        not topk: on a GPU torch.topk gives every group of m its own thread block (rows x cols / m blocks per
        linear and step), a sort takes many groups per block; on the CPU the sort is as fast (1.9 s against
        2.0 with its backward, 4096 x 11008 in float64). The same values, so the same τ."""
        groups = c.reshape(c.shape[0], -1, self.m)
        top = groups.sort(dim=-1, descending=True).values
        tau = (top[..., self.n - 1] + top[..., self.n]) / 2
        return torch.sigmoid((groups - tau.unsqueeze(-1)) / self.temperature).reshape(c.shape)

    def mask(self, kind):
        """'hard' (the STE's forward: top-n of the score in each group) or 'soft' (keep_prob)."""
        if kind == "hard":
            return nm_mask(self.score().detach(), self.n, self.m)
        return self.keep_prob(self.score())

    def hard_and_soft(self):
        """(hard mask, soft keep probabilities) from one score: the STE's forward and its gradient's path."""
        c = self.score()
        return nm_mask(c.detach(), self.n, self.m), self.keep_prob(c)

    def changed(self, keep):
        """The fraction of kept weights that Wanda's mask drops (each one replaces one that Wanda keeps)."""
        return float((keep & ~self.wanda_mask).sum() / keep.sum())

    def summary(self, keep):
        """How far the learned selection moved from Wanda's, and the learned mixing, for the report."""
        info = {"changed_vs_wanda": self.changed(keep)}
        if self.extra:
            info["phi_magnitude_mean"] = float(self.phi[:, 0].mean())
            info["phi_magnitude_absmax"] = float(self.phi[:, 0].abs().max())
        if self.bias is not None:
            info["channel_bias_std"] = float(self.bias.std())
        return info


class SelectionLearner:
    """The N:M learner: a GroupSelection for every targeted linear of one block (no penalty: N:M fixes
    the count)."""

    def __init__(self, ctx, config):
        self.targets = ctx.targets
        weights = {name: adapters.get_weight(m) for name, m in ctx.targets.items()}
        dtype = torch.promote_types(next(iter(weights.values())).dtype, torch.float32)
        self.selections = {name: GroupSelection(w, ctx.stats[name].norms(), config, dtype)
                           for name, w in weights.items()}

    def parameters(self):
        return [p for s in self.selections.values() for p in s.parameters()]

    def masked_weights(self, kind="ste"):
        return {name: masked_weight(adapters.get_weight(self.targets[name]), s, kind)
                for name, s in self.selections.items()}

    def start(self):
        """{name: (masked weight, its summary)} where learning starts: Wanda's N:M masks."""
        return {name: (adapters.get_weight(self.targets[name]) * s.wanda_mask,
                       {"changed_vs_wanda": s.changed(s.wanda_mask)})
                for name, s in self.selections.items()}

    def penalty(self):
        return 0.0

    def apply(self):
        info = {}
        for name, s in self.selections.items():
            keep = s.mask("hard")
            adapters.set_weight(self.targets[name], adapters.get_weight(self.targets[name]) * keep)
            info[name] = s.summary(keep)
        return info

    def block_info(self):
        return {}
