"""Perplexity by the SparseGPT protocol: non-overlapping seqlen windows over the tokenized text, the
mean next-token negative log-likelihood over every predicted token, exponentiated."""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checks import model_device, non_finite

# Positions per fp32 cross-entropy call: a 2048-token window's fp32 log-probabilities over a 128k vocabulary
# take 1 GiB, beside the logits themselves; a chunk's take an eighth of that.
CHUNK = 256


@torch.no_grad()
def perplexity(model, ids, seqlen, device=None, limit=None, progress=True) -> dict:
    """device: the model's (the default); a window whose log-likelihood is not finite is named."""
    device = model_device(model, device)
    windows = ids.shape[1] // seqlen
    if windows == 0:
        raise ValueError(f"the evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        windows = min(windows, limit)
    nll, count = 0.0, 0
    for w in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
        batch = ids[:, w * seqlen:(w + 1) * seqlen].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1]
        window = window_nll(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), CHUNK)
        if not math.isfinite(window):
            raise ValueError(non_finite(model, f"perplexity window {w}"))
        nll += window
        count += batch[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "tokens": windows * seqlen, "windows": windows, "seqlen": seqlen}


def window_nll(logits, targets, chunk) -> float:
    """The summed next-token negative log-likelihood of one window, in fp32, `chunk` positions at a time."""
    return sum(float(F.cross_entropy(logits[s:s + chunk].float(), targets[s:s + chunk], reduction="sum"))
               for s in range(0, targets.shape[0], chunk))
