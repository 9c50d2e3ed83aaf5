"""Perplexity by the SparseGPT protocol: non-overlapping seqlen windows over the tokenized text, the
mean next-token negative log-likelihood over every predicted token, exponentiated."""
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdsengine.pipeline.adapters import check_ids, eval_mode

from .checks import eval_device, non_finite
from .streamed import final_states

# Positions per fp32 cross-entropy call: a 2048-token window's fp32 log-probabilities over a 128k vocabulary
# take 1 GiB, beside the logits themselves; a chunk's take an eighth of that.
CHUNK = 256


# exp(709.8) is the largest float: a mean NLL past it (a broken model) has no perplexity to report.
MAX_NLL = math.log(sys.float_info.max)


@torch.no_grad()
def perplexity(model, ids, seqlen, device=None, limit=None, progress=True, weights=None) -> dict:
    """ppl, its mean nll, tokens, windows, seqlen. device: the model's (the default); a window whose
    log-likelihood is not finite is named. ppl is None where the mean nll is past MAX_NLL (exp overflows; inf
    would make the --json file invalid JSON), so that the tasks evaluated beside it keep their results.
    weights: a streaming.WeightStream that lends a skeleton `model` its weights a layer at a time (streamed.py); the
    model then runs on `device` (default: the CPU)."""
    check_windows(seqlen, limit)
    device = eval_device(model, device, weights)
    check_ids(model, ids, "the perplexity text's token ids (is it the model's tokenizer?)")
    windows = _count(ids, seqlen, limit)
    with eval_mode(model):
        if weights is None:
            nll = _mean_nll(model, ids, seqlen, windows, device, progress)
        else:
            with final_states(model, streamed_groups(ids, seqlen, limit), weights, device, progress):
                nll = _mean_nll(model, ids, seqlen, windows, device, progress)
    return {"ppl": math.exp(nll) if nll <= MAX_NLL else None, "nll": nll, "tokens": windows * seqlen,
            "windows": windows, "seqlen": seqlen}


def streamed_groups(ids, seqlen, limit=None) -> list:
    """The windows a streamed perplexity(model, ids, seqlen, limit=limit) runs, as final_states takes them."""
    windows = _count(ids, seqlen, limit)
    return [ids[0, :windows * seqlen].view(windows, seqlen)]


def _count(ids, seqlen, limit):
    """The windows of seqlen tokens evaluated: all that ids hold, at most limit."""
    windows = ids.shape[1] // seqlen
    if windows == 0:
        raise ValueError(f"the evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    return windows if limit is None else min(windows, limit)


def check_windows(seqlen, limit=None):
    """A window predicts seqlen - 1 tokens, so it needs two; evaluate checks these before any task runs."""
    if seqlen < 2:
        raise ValueError(f"perplexity needs windows of at least 2 tokens (seqlen), got {seqlen}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of windows or items, got {limit}")


def _mean_nll(model, ids, seqlen, windows, device, progress) -> float:
    nll, count = 0.0, 0
    for w in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
        batch = ids[:, w * seqlen:(w + 1) * seqlen].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1]
        window = window_nll(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), CHUNK)
        if not math.isfinite(window):
            raise ValueError(non_finite(model, f"perplexity window {w}"))
        nll += window
        count += batch[:, 1:].numel()
    return nll / count


def window_nll(logits, targets, chunk) -> float:
    """The summed next-token negative log-likelihood of one window, in fp32, `chunk` positions at a time."""
    return sum(float(F.cross_entropy(logits[s:s + chunk].float(), targets[s:s + chunk], reduction="sum"))
               for s in range(0, targets.shape[0], chunk))
