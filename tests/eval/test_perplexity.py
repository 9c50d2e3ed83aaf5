"""Perplexity's value: the mean next-token negative log-likelihood over every window, as the model's own
loss computes it, whatever the chunking of the fp32 cross-entropy; and the inputs a direct caller can get
wrong."""
import copy
import json
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


# ---- what a direct caller can get wrong ----------------------------------------------------------------

@pytest.mark.parametrize("seqlen, limit, message", [
    (1, None, "perplexity needs windows of at least 2 tokens \\(seqlen\\), got 1"),
    (0, None, "perplexity needs windows of at least 2 tokens \\(seqlen\\), got 0"),
    (16, 0, "limit must be a positive number of windows or items, got 0"),
    (16, -2, "limit must be a positive number of windows or items, got -2"),
])
def test_windows_without_a_prediction_and_limits_below_one_are_refused(model, seqlen, limit, message):
    with pytest.raises(ValueError, match=message):  # was a ZeroDivisionError
        ppl.perplexity(model, torch.zeros(1, 40, dtype=torch.long), seqlen, limit=limit, progress=False)


def test_ids_past_the_vocabulary_are_named_not_an_index_error(model):
    ids = torch.tensor([[1, 2, 64, 3]])  # the model's vocabulary is 64 tokens
    with pytest.raises(ValueError, match=r"token ids \(is it the model's tokenizer\?\) must lie in \[0, 64\) "
                                         r"\(the model's vocabulary\), got 1\.\.64"):
        ppl.perplexity(model, ids, 2, progress=False)


@pytest.mark.parametrize("length", [0, 5])
def test_a_text_shorter_than_a_window_is_named(model, length):
    """No ids at all (an empty file) too: the vocabulary check must not fail first on an empty tensor."""
    with pytest.raises(ValueError, match=f"the evaluation text has {length} tokens, fewer than one window of 16"):
        ppl.perplexity(model, torch.zeros(1, length, dtype=torch.long), 16, progress=False)


def test_a_mean_nll_past_exps_range_gives_no_ppl_but_valid_json(model):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.mul_(1e5)  # logits of ~1e5: a mean nll in the thousands
    result = ppl.perplexity(broken, torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(1)), 16,
                            progress=False)
    assert result["ppl"] is None and result["nll"] > ppl.MAX_NLL  # was an OverflowError
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_a_model_in_training_mode_is_scored_in_eval_mode_and_left_as_it_came(model):
    dropping = copy.deepcopy(model)
    dropping.config.attention_dropout = 0.5  # read at each forward: random scores in training mode
    for layer in dropping.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(1))
    expected = ppl.perplexity(dropping, ids, 16, progress=False)["ppl"]
    dropping.train()
    dropping.model.norm.eval()  # a caller's mixed modes come back module by module
    assert ppl.perplexity(dropping, ids, 16, progress=False)["ppl"] == pytest.approx(expected, rel=1e-6)
    assert dropping.training and dropping.model.layers[0].training and not dropping.model.norm.training
