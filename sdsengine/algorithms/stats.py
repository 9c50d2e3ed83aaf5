"""Calibration statistics accumulated from a linear layer's inputs, in fp32.

Each takes batches of inputs (..., in_features) and is consumed by an algorithm's `prune`.
"""
import torch


class InputNorms:
    """Sum of squares per input channel: ||X_j||_2^2 over every calibration token (Wanda)."""

    def __init__(self, in_features, device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x):
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    def norms(self):
        return self.sq.sqrt()


class Hessian:
    """H = 2/N * sum x x^T over the calibration tokens (SparseGPT's layer-wise Hessian)."""

    def __init__(self, in_features, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x):
        x = x.reshape(-1, x.shape[-1]).float()
        total = self.tokens + x.shape[0]
        self.H *= self.tokens / total
        x = x * (2.0 / total) ** 0.5
        self.H += x.T @ x
        self.tokens = total

    def norms(self):
        """Input-channel norms, up to a common scale (lets Wanda-style scores reuse a Hessian)."""
        return torch.diagonal(self.H).clamp_min(0).sqrt()
