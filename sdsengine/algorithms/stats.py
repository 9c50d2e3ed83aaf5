"""Calibration statistics accumulated from a linear layer's inputs, in fp32.

Each takes batches of inputs (..., in_features) and is consumed by an algorithm's `prune`. Where the
method asked for the dense stream, add_batch also gets the same tokens' inputs in the unpruned model
(dense_x); otherwise dense_x is None.
"""
import torch


class InputNorms:
    """Sum of squares per input channel: ||X_j||_2^2 over every calibration token (Wanda)."""

    def __init__(self, in_features, device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    @staticmethod
    def nbytes(in_features, dense_stream):
        """The bytes one holds (a prune's plan, api.plan)."""
        return 4 * in_features

    def add_batch(self, x, dense_x=None):
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    def norms(self):
        return self.sq.sqrt()

    def merge(self, summed):
        """Add the statistics of the other processes' tokens (data-parallel: pipeline/parallel.py); summed(*t)
        sums tensors across the processes in place."""
        tokens = torch.tensor(float(self.tokens), dtype=torch.float64, device=self.sq.device)
        summed(tokens, self.sq)
        self.tokens = int(tokens)


class Hessian:
    """H = 2/N * sum x x^T over the calibration tokens (SparseGPT's layer-wise Hessian). Given the dense
    stream's inputs d too: C = 2/N * sum d x^T and T = 2/N * sum d d^T, so that for a teacher W on dense
    inputs, ½ * 2/N * sum ||W d - V x||^2 = ½ (tr(V H V^T) - 2 tr(W C V^T) + tr(W T W^T))."""

    def __init__(self, in_features, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.C = self.T = None
        self.tokens = 0

    @staticmethod
    def nbytes(in_features, dense_stream):
        """The bytes one holds (a prune's plan, api.plan): H, and C and T with the dense stream."""
        return 4 * in_features ** 2 * (3 if dense_stream else 1)

    def add_batch(self, x, dense_x=None):
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.tokens + x.shape[0]
        keep, scale = self.tokens / total, (2.0 / total) ** 0.5
        x = x * scale
        self.H.mul_(keep).addmm_(x.T, x)
        if dense_x is not None:
            d = dense_x.reshape(-1, dense_x.shape[-1]).float() * scale
            if self.C is None:
                self.C, self.T = torch.zeros_like(self.H), torch.zeros_like(self.H)
            self.C.mul_(keep).addmm_(d.T, x)
            self.T.mul_(keep).addmm_(d.T, d)
        self.tokens = total

    def merge(self, summed):
        """Add the statistics of the other processes' tokens (data-parallel: pipeline/parallel.py); summed(*t)
        sums tensors across the processes in place. Each process's sums are means over its own tokens: weighted
        by its share of all the tokens, they add up to the means over all. A process whose inputs had no dense
        stream (an expert its windows did not reach) adds zeros to C and T."""
        counts = torch.tensor([float(self.tokens), float(self.C is not None)], dtype=torch.float64,
                              device=self.H.device)
        summed(counts)
        total, dense = int(counts[0]), bool(counts[1])
        if dense and self.C is None:
            self.C, self.T = torch.zeros_like(self.H), torch.zeros_like(self.H)
        sums = [self.H, self.C, self.T] if dense else [self.H]
        for t in sums:
            t.mul_(self.tokens / max(total, 1))
        summed(*sums)
        self.tokens = total

    def norms(self):
        """Input-channel norms, up to a common scale (lets Wanda-style scores reuse a Hessian)."""
        return torch.diagonal(self.H).clamp_min(0).sqrt()
