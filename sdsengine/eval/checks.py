"""Checks shared by the evaluators: where the model runs, and log-likelihoods that are not numbers."""
import torch


def model_device(model, device=None):
    """The model's device, or `device` if it names that one: a mismatch would fail deep inside the forward."""
    home = next(model.parameters()).device
    wanted = home if device is None else torch.device(device)
    if wanted.type != home.type or (home.type != "cpu" and wanted.index not in (None, home.index)):  # cpu:0 is cpu
        raise ValueError(f"the model is on {home}, but evaluation was asked on {device}: move the model there "
                         "(model.to(device)) or leave the device out")
    return home


def eval_device(model, device=None, weights=None):
    """Where the evaluation runs: model_device's answer, or for a skeleton lent its weights by `weights` (a
    streaming.WeightStream), `device` itself (default: the CPU)."""
    return model_device(model, device) if weights is None else torch.device(device or "cpu")


def non_finite(model, where):
    """The error for log-likelihoods that are inf or NaN, which would otherwise average into a NaN
    perplexity or make every zero-shot answer choice 0."""
    dtype = next(model.parameters()).dtype
    hint = (": float16 logits overflow in models trained in bfloat16; evaluate in bfloat16 or float32"
            if dtype == torch.float16 else "")
    return f"{where}: the model's log-likelihoods are not finite in {dtype}{hint}"
