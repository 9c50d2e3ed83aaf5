"""Data-parallel pruning: several processes (torchrun), each calibrating on its share of the windows.

Inside a torch.distributed process group of more than one process, sdsengine.prune runs data-parallel. Every
process holds the model (or its skeleton: see the end) and the same calibration windows, and replays only its
share of the windows through each layer: the forward passes, and the activations kept between layers (a prune's
largest buffers), are split between the processes. Per layer:
- each linear's input statistics (Wanda's norms, the Hessian) are summed across the processes, so that every
  process holds those of all the windows (merge_stats);
- each linear is pruned by one process, the linears spread over the processes by their cost, largest first,
  and its result is sent to the others: every process ends each layer with the same weights (spread);
- the layer's output error, and the layer guard's, are summed across the processes (summed).
The result is a one-process run's on the same windows, up to the rounding of sums taken in another order.
BESA learns data-parallel too: each process takes its own of each step's windows and the gradients are summed,
so that P processes learn as one process with --batch P (algorithms/besa_block.py); SDS on BESA's masks spreads its
reconstruction like the other per-linear steps. A resumable run (pipeline/resume.py) keeps each process's
activations in a file of its own; the first process keeps the weights and the manifest.
Only the first process needs the model's weights: a process holding it as a skeleton (parameters on the meta device,
as the CLI loads it in every process after the first) is lent each layer's weights for the layer's turn (lent).
"""
import contextlib
import datetime
import hashlib
import os
import socket

import torch
import torch.distributed as dist
# Imported before any process group exists: its functions take `group=group.WORLD` as a default argument, so an import
# after init_process_group (transformers' model load makes one) keeps the default group alive past
# destroy_process_group, and its worker threads then ran into the interpreter's exit: one still dropping a finished
# all_gather's tensors needed the GIL there and aborted the process ("terminate called without an active exception")
import torch.distributed.nn  # noqa: F401

from . import adapters


# How long a process waits in a collective call: while one process prunes a linear, the others wait for it (SDS on a
# 70B-class down_proj takes minutes), beyond NCCL's default of 10 minutes
WAIT = datetime.timedelta(hours=2)


def world() -> int:
    """The size of the process group this process is in, 1 outside one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


@contextlib.contextmanager
def joined(device):
    """Inside torchrun (WORLD_SIZE above 1 in the environment), this process in torchrun's group for the block:
    NCCL for --device cuda, each process on the GPU of its LOCAL_RANK, or gloo on the CPU. Yields the process's
    device; elsewhere `device` itself, and nothing else happens."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or world() > 1:
        yield device
        return
    kind, _, index = str(device).partition(":")
    if index:
        raise ValueError(f"--device {device} under torchrun: each process takes the GPU of its LOCAL_RANK; pass "
                         "--device cuda")
    if kind == "cuda":
        here, count = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if here > count:  # NCCL takes one GPU per process; every process refuses, none waits for the others
            raise ValueError(f"torchrun started {here} processes on this machine and {count} GPU(s) are visible "
                             "here: start one process per GPU (--nproc-per-node)")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=WAIT)
    try:
        yield device
        dist.barrier()  # the processes leave together
    finally:
        dist.destroy_process_group()


def check(config):
    """Refuse, by name, a setting the processes cannot share (BESA's --batch)."""
    if world() > 1:
        batch_of(getattr(config, "batch", None))


def same_model(model):
    """Refuse processes that hold different models: each must load the same one (compared by its parameters' and
    buffers' names, shapes and dtypes; a skeleton's, on the meta device, count as the model's)."""
    if world() == 1:
        return
    held = gathered([(name, tuple(t.shape), str(t.dtype)) for name, t in (*model.named_parameters(),
                                                                           *model.named_buffers())])
    for r, theirs in enumerate(held[1:], 1):
        if theirs != held[0]:
            first, other = next(((a, b) for a, b in zip(held[0] + [None], theirs + [None]) if a != b))
            raise ValueError(f"process {r} holds another model than the first: {_described(other)} where the first "
                             f"holds {_described(first)} (each process must load the same model, in one --dtype)")


def _described(entry):
    return "nothing more" if entry is None else f"{entry[0]} {list(entry[1])} {entry[2]}"


@contextlib.contextmanager
def lent(modules, device):
    """Inside the block, a process that holds `modules` as a skeleton (parameters on the meta device: the CLI's
    processes after the first load no weights) holds the first process's parameters and buffers of them on `device`,
    and lets them go after. So only the first process holds the whole model in memory; the others hold the layer
    they run. Every process enters together, the first with its modules on `device`. Where no process holds a
    skeleton, nothing happens."""
    mine = any(map(is_skeleton, modules))
    borrowing = gathered(mine)
    if borrowing[0]:
        lends = " (the first process of a group lends the others the weights)" if world() > 1 else ""
        raise ValueError(f"the model's parameters are on the meta device (a skeleton, no weights): load the model with "
                         f"its weights{lends}")
    if not any(borrowing):
        yield
        return
    taken = [_borrowed(store, name, device, mine) for store, name in _slots(modules)]
    try:
        yield
    finally:
        for store, name, own in taken:
            store[name] = own


def is_skeleton(module):
    """Whether the module's parameters are on the meta device (a skeleton's, lent its weights: see lent)."""
    return any(p.is_meta for p in module.parameters())


def _slots(modules):
    """(the dict that holds it, its name) of every parameter and buffer of `modules`, in one order everywhere."""
    subs = list({id(s): s for m in modules for s in m.modules()}.values())
    return [(store, name) for s in subs for store in (s._parameters, s._buffers)
            for name, t in store.items() if t is not None]


def _borrowed(store, name, device, keep):
    """The first process's tensor store[name], sent to every process; put in its place where `keep` (returns what to
    put back after), received and dropped elsewhere."""
    own = store[name]
    tensor = own.detach().contiguous() if rank() == 0 else torch.empty(own.shape, dtype=own.dtype, device=device)
    dist.broadcast(tensor, 0)
    if keep:
        store[name] = torch.nn.Parameter(tensor, own.requires_grad) if isinstance(own, torch.nn.Parameter) else tensor
    return store, name, own


def from_first(compute, *args):
    """compute(*args) as the first process finds it, in every process (the others may hold a skeleton, or must not
    repeat it: a write); where it raises there, the same error is raised in every process, none left waiting."""
    if world() == 1:
        return compute(*args)
    outcome = [None]
    if rank() == 0:
        try:
            outcome = [(None, compute(*args))]
        except Exception as exc:
            outcome = [(exc, None)]
    dist.broadcast_object_list(outcome, 0, device=_collective_device())
    error, value = outcome[0]
    if error is not None:
        raise error
    return value


def raised_anywhere(error):
    """Every process passes the error it met (None: none), and every process raises the first process's in rank
    order, if any: one that failed alone (a full disk) would leave the others waiting in the next collective call."""
    errors = gathered(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def share(samples):
    """This process's windows: of P processes, process r takes windows r, r + P, r + 2P, ... (so that the windows of
    one BESA step spread over the processes). Every process must have been given the same windows: their
    fingerprints are compared first."""
    if world() == 1:
        return samples
    if samples.shape[0] < world():
        raise ValueError(f"{samples.shape[0]} calibration windows cannot be shared by {world()} processes: "
                         "give at least one window per process (--nsamples)")
    prints = gathered(_fingerprint(samples))
    if len(set(prints)) > 1:
        raise ValueError(f"the processes were given different calibration windows ({prints}): each must build the "
                         "same ones (the same --calib, --nsamples, --seqlen and --seed)")
    mine = dealt(samples.shape[0])
    return samples[mine.start::mine.step]


def dealt(total, r=None):
    """The windows of `total` that process r (default: this one) replays, in the numbering of all of them: r,
    r + P, r + 2P, ... of P processes (so that the windows of one BESA step spread over the processes)."""
    return range(rank() if r is None else r, total, world())


def _fingerprint(samples):
    return f"{tuple(samples.shape)} {hashlib.sha1(samples.cpu().numpy().tobytes()).hexdigest()[:12]}"


def summed(*tensors):
    """Each tensor summed across the processes, in place (each on the run's device)."""
    if world() > 1:
        for t in tensors:
            dist.all_reduce(t)
    return tensors


def merge_stats(stats):
    """Sum each linear's statistics across the processes. Linears that read one tensor share one statistics
    object (q/k/v); a process whose windows never reached a mixture's expert holds unshared empty ones for its
    projections: the sharing is joined across the processes first, so that each object is summed once, by
    every process, in one order."""
    if world() == 1:
        return
    # every order here is by name: a mixture's linears may come in another order in each process (the experts
    # its first window reached first), and the processes must meet in each collective call in one order
    for names in sorted(_joined(gathered(_shared_names(stats)))):
        one = _the_object(stats, names)
        for name in names:
            stats[name] = one
        one.merge(summed)


def _shared_names(stats):
    """The names in `stats` grouped by the object they hold."""
    groups = {}
    for name, s in stats.items():
        groups.setdefault(id(s), []).append(name)
    return list(groups.values())


def _joined(partitions):
    """The finest partition that every one of `partitions` refines: names grouped in any are grouped here."""
    group_of = {}
    for partition in partitions:
        for names in partition:
            merged = set(names).union(*(group_of.get(n, ()) for n in names))
            for n in merged:
                group_of[n] = merged
    return list({id(g): sorted(g) for g in group_of.values()}.values())


def _the_object(stats, names):
    """The one statistics object these linears share here: the one that saw tokens (a process holds one at most,
    or the linears did not read one tensor), else the first."""
    held = list({id(stats[n]): stats[n] for n in names}.values())
    reached = [s for s in held if s.tokens]
    if len(reached) > 1:
        raise RuntimeError(f"linears {names} share their statistics in one process and read different inputs in "
                           "another")
    return reached[0] if reached else held[0]


def spread(modules, prune_one):
    """{name: prune_one(name)} for every module of {name: module}, each pruned by one process (the largest first,
    each to the process with the least work so far) and its weight and info sent to the others."""
    if world() == 1:
        return {name: prune_one(name) for name in modules}
    owners = _owners({name: adapters.get_weight(m) for name, m in modules.items()})
    infos = {name: prune_one(name) for name in sorted(modules) if owners[name] == rank()}
    for name in sorted(modules):  # every process in one order (see merge_stats)
        infos[name] = _broadcast_result(modules[name], infos.get(name), owners[name])
    return {name: infos[name] for name in modules}


def _owners(weights):
    """name -> the process that prunes it: longest first to the least loaded, by rows x columns² (the Hessian
    methods' cost; any order by size would do for the others)."""
    load = [0] * world()
    owners = {}
    for name in sorted(weights, key=lambda n: (-weights[n].numel() * weights[n].shape[1], n)):
        owners[name] = min(range(world()), key=lambda r: load[r])
        load[owners[name]] += weights[name].numel() * weights[name].shape[1]
    return owners


def _broadcast_result(module, info, src):
    """The pruned weight and the info of the process `src`, in every process; returns the info. The info's tensors
    (a fallback weight) go as tensors, to each process's device; the rest as a picklable object."""
    weight = adapters.get_weight(module).contiguous()
    dist.broadcast(weight, src)
    if rank() != src:
        adapters.set_weight(module, weight)
    light = [None if info is None else {k: _Shape(v) if torch.is_tensor(v) else v for k, v in info.items()}]
    dist.broadcast_object_list(light, src, device=_collective_device())
    if light[0] is None:
        return None
    received = dict(light[0])
    for key, value in received.items():
        if isinstance(value, _Shape):
            tensor = info[key].contiguous() if rank() == src else value.empty(weight.device)
            dist.broadcast(tensor, src)
            received[key] = tensor
    return received


class _Shape:
    """A tensor's shape and dtype, sent in its place."""

    def __init__(self, tensor):
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def empty(self, device):
        return torch.empty(self.shape, dtype=self.dtype, device=device)


class Windows:
    """This process's `count` calibration windows, as share() dealt them, among the `total` of all processes."""

    def __init__(self, count, device):
        self.total = count if world() == 1 else int(summed(torch.tensor(count, device=device))[0])
        self.numbers = dealt(self.total)  # of this process's windows, in the numbering of all

    def mine(self, start, stop):
        """This process's indices of windows start, ..., stop - 1 of all."""
        return [i for i, n in enumerate(self.numbers) if start <= n < stop]

    def among(self, chosen):
        """This process's indices of the windows of all in `chosen`, in order."""
        return [i for i, n in enumerate(self.numbers) if n in chosen]


def batch_of(asked):
    """BESA's windows per step: --batch, by default 1 in one process and one per process in a group."""
    if asked is None:
        return world()
    if asked % world():
        raise ValueError(f"--batch {asked} in a group of {world()} processes: the processes take equal shares of a "
                         f"step's windows; pass a multiple of {world()}")
    return asked


def summed_float(x):
    """A number (or a 0-d tensor) summed across the processes, as a Python float."""
    if world() == 1:
        return float(x)
    t = x.detach().double().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    return float(summed(t.to(_collective_device()))[0])


def summed_grads(params):
    """Each parameter's gradient summed across the processes (a process that saw no window of the step adds
    zeros)."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    summed(*(p.grad for p in params))


def same_everywhere(tensors):
    """The first process's values of these tensors, in every process."""
    if world() > 1:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, 0)


def _collective_device():
    """Where a small tensor must sit for a collective: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def describe(samples, memory):
    """The run report's account of a data-parallel run: its processes, each one's windows and peak memory (the
    report's `memory` is the first process's)."""
    windows = None if samples is None else [len(dealt(samples.shape[0], r)) for r in range(world())]
    return {"processes": world(), "backend": dist.get_backend(), "windows": windows, "memory": gathered(memory)}


def on_this_machine(value):
    """The sum of `value` over the processes on this machine (by host name): this one's alone outside a group."""
    if world() == 1:
        return value
    here = socket.gethostname()
    return sum(v for host, v in gathered((here, value)) if host == here)


def gathered(obj):
    """[obj of each process], in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
