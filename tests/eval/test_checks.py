"""What every evaluator checks first: that it runs where the model is, and that the model's
log-likelihoods are numbers (an fp16 model whose logits overflow would average into a NaN perplexity, or
make every zero-shot answer choice 0)."""
import copy
import math

import pytest
import torch

from sdsengine.eval.perplexity import perplexity
from sdsengine.eval.zeroshot import loglikelihoods


def overflowing(model, dtype):
    broken = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        broken.lm_head.weight[3].fill_(float("inf"))
    return broken


def test_evaluation_runs_where_the_model_is_unless_asked_elsewhere(model):
    ids = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, 16, progress=False)["windows"] == 2  # no device: the model's
    assert perplexity(model, ids, 16, device="cpu", progress=False)["windows"] == 2
    assert perplexity(model, ids, 16, device="cpu:0", progress=False)["windows"] == 2  # the one CPU device
    with pytest.raises(ValueError, match="the model is on cpu, but evaluation was asked on meta: move the model"):
        perplexity(model, ids, 16, device="meta", progress=False)
    with pytest.raises(ValueError, match="the model is on cpu, but evaluation was asked on meta"):
        loglikelihoods(model, [([1, 2], [3])], device="meta", progress=False)


@pytest.mark.parametrize("dtype, hint", [(torch.float32, ""), (torch.float16, "evaluate in bfloat16 or float32")])
def test_log_likelihoods_that_are_not_numbers_are_named(model, dtype, hint):
    broken = overflowing(model, dtype)
    ids = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"perplexity window 0: the model's log-likelihoods are not finite in "
                                         f"{dtype}.*{hint}"):
        perplexity(broken, ids, 16, progress=False)
    with pytest.raises(ValueError, match=f"piqa: the model's log-likelihoods are not finite in {dtype}"):
        loglikelihoods(broken, [([1, 2], [3]), ([1, 2], [4])], desc="piqa", progress=False)
    assert all(map(math.isfinite, loglikelihoods(model, [([1, 2], [3])], progress=False)))
