"""The block-learning loop shared by BESA's learners (row rates, N:M selection).

A learner owns the learnable tensors and turns them into masked weights W' = sg(W) * M, M from the
straight-through estimator. The block runs through torch.func.functional_call with those weights: the
layer itself is never modified (no hooks or parametrizations to leave behind), and every other parameter
is passed detached so no gradient reaches the model.
"""
import torch
from torch.func import functional_call

from sdsengine.pipeline import adapters


def learn(ctx, learner, config):
    """Run config.epochs passes of one calibration window per step; returns the block losses seen."""
    if config.epochs == 0:
        return []
    optimizer = make_optimizer(learner.parameters(), config)
    targets = block_targets(ctx, config)
    energy = channel_energy(targets, ctx.device)
    losses = []
    with torch.enable_grad():
        for _ in range(config.epochs):
            for j in range(ctx.inps.shape[0]):
                rec = block_loss(ctx, learner.masked_weights("ste"), j, targets, energy)
                loss = rec + learner.penalty()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(rec.detach()))
    return losses


def block_targets(ctx, config):
    """What the masked block must reproduce: the dense block on the same (pruned-stream) inputs, or the
    dense model's outputs of this block (which also asks the block to undo the error upstream)."""
    if config.target == "dense_block":
        return ctx.outs
    if ctx.dense_outs is None:
        raise ValueError("BESA target 'dense_model' needs the dense stream; run it through the pipeline")
    return ctx.dense_outs


def block_loss(ctx, weights, j, targets, energy):
    """Channel-normalized MSE of the block on window j: each hidden channel's error over its energy."""
    y = masked_forward(ctx.layer, weights, ctx.targets, ctx.inps[j:j + 1].to(ctx.device), ctx.kwargs)
    dtype = _accumulation_dtype(y)
    target = targets[j:j + 1].to(ctx.device, dtype)
    err = (y.to(dtype) - target).pow(2).reshape(-1, y.shape[-1]).mean(dim=0)
    return (err / energy).mean()


def _accumulation_dtype(x):
    """fp32 for half-precision models, fp64 kept for fp64 ones (the gradient tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def masked_forward(layer, weights, targets, x, kwargs):
    """layer(x) with weights[name] ((out, in), as get_weight returns them) in place of the targets' weights."""
    params = {name: p.detach() for name, p in layer.named_parameters()}
    for name, w in weights.items():
        module = targets[name]
        params[f"{name}.weight"] = (w.T if isinstance(module, adapters.Conv1D) else w).to(module.weight.dtype)
    return adapters.layer_output(functional_call(layer, params, (x,), kwargs))


def channel_energy(outs, device):
    """Mean square of each hidden channel of the dense outputs over all windows (floored so that dead
    channels do not dominate)."""
    energy = torch.zeros(outs.shape[-1], device=device, dtype=_accumulation_dtype(outs))
    for j in range(outs.shape[0]):
        energy += outs[j].to(device, energy.dtype).pow(2).mean(dim=0)
    energy /= outs.shape[0]
    return energy.clamp_min(1e-6 * float(energy.mean()) + 1e-30)


def make_optimizer(params, config):
    params = list(params)
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise RuntimeError("--optimizer prodigy needs the optional package prodigyopt "
                               "(pip install prodigyopt)") from None
        return Prodigy(params, lr=config.lr)
    return torch.optim.Adam(params, lr=config.lr)


def ste(hard, soft):
    """Forward value of `hard`, gradient of `soft`."""
    return hard.to(soft.dtype) - soft.detach() + soft


def loss_summary(losses):
    """First and last losses (means over the first and last tenth of the steps) for the report."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "steps": len(losses)}
