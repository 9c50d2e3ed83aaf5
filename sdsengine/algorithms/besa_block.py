"""The block-learning loop shared by BESA's learners (row rates, N:M selection).

A learner owns the learnable tensors and turns them into masked weights W' = sg(W) * M, M from the
straight-through estimator. The block runs through torch.func.functional_call with those weights: the
layer itself is never modified (no hooks or parametrizations to leave behind), and every other parameter
is passed detached so no gradient reaches the model.
"""
import torch
from torch.func import functional_call

from sdsengine.pipeline import adapters, parallel

from .timing import Laps, trace, tracing

TRACE_EVERY = 16  # learning steps between two SDSENGINE_TRACE lines


def learn(ctx, learner, config, checks=0, laps=None):
    """Run config.epochs passes over the calibration windows, `batch` windows a step (their mean loss: one in one
    process, by default); returns the block losses seen, the step size and batch used plus, with checks > 0, the
    BestIterate record (the learner is left at its best checked iterate). laps (timing.Laps), if given, is
    charged the setup, the steps and the checks apart. In a data-parallel group each process takes its own of a
    step's windows and the gradients are summed (pipeline/parallel.py): P processes learn as one process with
    --batch P, up to rounding."""
    if config.epochs == 0:
        return [], {}
    laps = Laps(ctx.device, "besa") if laps is None else laps
    windows = parallel.Windows(ctx.inps.shape[0], ctx.device)
    batch = parallel.batch_of(config.batch)
    steps = config.epochs * -(-windows.total // batch)
    lr = config.step_size(steps, batch)
    params = list(learner.parameters())
    optimizer = make_optimizer(params, config, lr)
    targets = block_targets(ctx, config)
    energy = laps.after("setup", channel_energy(targets, ctx.device))
    best = BestIterate(ctx, learner, targets, energy, checks, windows) if checks else None
    losses = []
    with torch.enable_grad():
        for _ in range(config.epochs):
            for start in range(0, windows.total, batch):
                if best and best.due(len(losses)):
                    laps.after("steps", None)
                    laps.after("checks", best.check(len(losses)))
                optimizer.zero_grad(set_to_none=True)
                count = min(batch, windows.total - start)
                rec = _backward(ctx, learner, windows.mine(start, start + count), count, targets, energy)
                parallel.summed_grads(params)
                optimizer.step()
                losses.append(parallel.summed_float(rec))
                if tracing() and len(losses) % TRACE_EVERY == 0:  # the steps are one lap: show their pace
                    trace(f"besa {len(losses)} of {steps} steps: {laps.running():.3f} s")
    laps.after("steps", None)
    record = laps.after("checks", best.restore(steps)) if best else {}
    parallel.same_everywhere(params)  # a group's processes apply one learned mask (summed gradients agree anyway)
    return losses, {"lr": lr, "batch": batch, **record}


def _backward(ctx, learner, mine, count, targets, energy):
    """Backpropagate one step's loss over this process's windows `mine` of the step's `count`: each window's loss
    over count, one window at a time (one window's activations held at once), and the penalty (over the
    processes, whose gradients are summed) with the last. Returns the block loss of those windows (a tensor)."""
    weights = learner.masked_weights("ste")
    penalty = learner.penalty() / parallel.world()
    rec = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i, j in enumerate(mine):
        loss = block_loss(ctx, weights, j, targets, energy) / count
        rec = rec + loss.detach()
        last = i == len(mine) - 1
        (loss + penalty if last else loss).backward(retain_graph=not last)  # the masked weights' graph is shared
        del loss  # this window's activations, before the next window's forward
    if not mine and torch.is_tensor(penalty):  # no window of this step here: the penalty's share only
        penalty.backward()
    return rec


class BestIterate:
    """The learner's parameters at the lowest hard-mask block loss measured on a few fixed windows, at the
    start and at steps 8, 16, 32, ... and the last. The STE surrogate can lower its own loss while the
    hard-mask loss rises: at 2:4 with 128 steps per block it fell to 0.94x the start by step 16 and rose to
    1.36x by step 128 (SmolLM2-135M layer 0; docs/BESA.md). The start is a candidate, so the kept
    iterate never measures worse than the starting masks."""

    def __init__(self, ctx, learner, targets, energy, count, windows):
        n = windows.total
        chosen = set(torch.linspace(0, n - 1, min(count, n)).round().long().tolist())
        self.count, self.windows = len(chosen), windows.among(chosen)  # this process's of them
        self.ctx, self.learner, self.targets, self.energy = ctx, learner, targets, energy
        self.history, self.best = [], None

    @staticmethod
    def due(step):
        """Before learning and after 8, 16, 32, ... steps (the last is checked by restore)."""
        return step == 0 or (step >= 8 and step & (step - 1) == 0)

    @torch.no_grad()
    def check(self, step):
        weights = self.learner.masked_weights("hard")
        loss = parallel.summed_float(sum(float(block_loss(self.ctx, weights, j, self.targets, self.energy))
                                         for j in self.windows)) / self.count
        self.history.append([step, loss])
        if self.best is None or loss < self.best[1]:
            self.best = (step, loss, [p.detach().clone() for p in self.learner.parameters()])

    @torch.no_grad()
    def restore(self, steps):
        """Check the last iterate (unless just checked), restore the best; returns the record."""
        if self.history[-1][0] != steps:
            self.check(steps)
        for p, saved in zip(self.learner.parameters(), self.best[2]):
            p.copy_(saved)
        return {"checks": self.history, "kept_step": self.best[0]}


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
    parallel.summed(energy)  # data-parallel: every process's windows
    energy /= parallel.Windows(outs.shape[0], device).total
    return energy.clamp_min(1e-6 * float(energy.mean()) + 1e-30)


def make_optimizer(params, config, lr):
    params = list(params)
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise RuntimeError("--optimizer prodigy needs the optional package prodigyopt "
                               "(pip install prodigyopt)") from None
        return Prodigy(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


def masked_weight(weight, part, kind):
    """weight ⊙ the mask of `part` (a learner's RowRates or GroupSelection): its 'hard' or 'soft' mask, or 'ste',
    the straight-through estimator sg(W) ⊙ (M_hard − sg(P) + P)."""
    if kind == "ste":
        return _SteMasked.apply(weight, *part.hard_and_soft())
    return weight * part.mask(kind)


class _SteMasked(torch.autograd.Function):
    """sg(W) ⊙ (M_hard − sg(P) + P) as one op: forward W ⊙ M_hard in W's dtype, backward P's gradient g ⊙ W in
    P's dtype. Bit for bit what the three-op form gives, cast to W's dtype as the block runs it ((1 − P) + P is
    exactly 1 and (0 − P) + P exactly +0 under round-to-nearest; its backward takes the same product in P's
    dtype), without its copies in P's dtype: the N:M learner's P is float64, which made every masked weight a
    float64 copy of W, each step."""

    @staticmethod
    def forward(ctx, weight, hard, soft):
        ctx.save_for_backward(weight)
        ctx.soft_dtype = soft.dtype
        return weight * hard.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, = ctx.saved_tensors
        return None, None, grad.to(ctx.soft_dtype) * weight.to(ctx.soft_dtype)


def loss_summary(losses):
    """First and last losses (means over the first and last tenth of the steps) for the report."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "steps": len(losses)}
