"""Perplexity's value: the mean next-token negative log-likelihood over every window, as the model's own
loss computes it, whatever the chunking of the fp32 cross-entropy."""
import math

import pytest
import torch

from sdsengine.eval import perplexity as ppl


@pytest.mark.parametrize("chunk", [1, 4, 5, 15, 16, 256])  # one position, a partial last chunk, even, the 15 targets, more
def test_perplexity_is_the_exponentiated_mean_loss_of_the_windows(model, monkeypatch, chunk):
    monkeypatch.setattr(ppl, "CHUNK", chunk)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))  # 2 windows; 8 tokens unused
    with torch.no_grad():  # HF's loss: the mean over a window's 15 predicted tokens
        losses = [float(model(ids[:, w * 16:(w + 1) * 16], labels=ids[:, w * 16:(w + 1) * 16]).loss) for w in (0, 1)]
    result = ppl.perplexity(model, ids, 16, progress=False)
    assert result["windows"] == 2 and result["tokens"] == 32
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)


def test_a_window_is_summed_in_fp32_whatever_the_logits_dtype():
    logits = torch.randn(10, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.arange(10) % 7
    exact = float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
    assert ppl.window_nll(logits, targets, chunk=3) == pytest.approx(exact, rel=1e-6)
