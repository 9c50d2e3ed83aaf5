"""The memory a prune's calibration activations take, known before any work.

They dominate a prune's memory: nsamples x seqlen x hidden per buffer (4 GiB for a Llama-7B layer width at
128 x 2048 in fp32; wanda #68), two buffers (a layer's inputs and outputs), four with the dense model's
stream. A run that cannot hold them used to fail after loading the model and calibrating, or take the
machine into swap; so the pipeline sizes them first, keeps them on the GPU only when they fit in half its
free memory, and refuses to start, naming the sizes, where they cannot fit at all.
"""
import torch

GiB = 2 ** 30


def describe(nbytes) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2 ** 20:.1f} MiB"


def activation_bytes(model, nsamples, seqlen, dense_stream) -> int:
    """Bytes of the activation buffers kept between layers (in the model's dtype)."""
    return (4 if dense_stream else 2) * buffer_bytes(model, nsamples, seqlen)


def buffer_bytes(model, nsamples, seqlen) -> int:
    """Bytes of one buffer of hidden states of nsamples windows of seqlen tokens, in the model's dtype."""
    return nsamples * seqlen * model.config.hidden_size * next(model.parameters()).element_size()


def available_bytes(device) -> int | None:
    """Memory free for new tensors on `device` (the host: MemAvailable, which counts reclaimable cache);
    None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def store_device(device, need) -> torch.device:
    """Where the activations live: the compute device when they fit in half its free memory (the rest is
    for the layer's work), else the host, from which each window moves to the device in turn."""
    if device.type == "cuda" and need < available_bytes(device) / 2:
        return device
    return torch.device("cpu")


def check_fits(need, store, what, remedy, others=0):
    """Raise before any work if `what` (buffers of `need` bytes, named for people) cannot fit where it is to be stored;
    `remedy`: what the user can lower. others: the bytes that other processes of a data-parallel group keep in the same
    memory (this machine's host memory)."""
    free = available_bytes(store)
    if free is not None and need + others > free:
        beside = f", and this machine's other processes {describe(others)} beside them" if others else ""
        raise ValueError(f"{what} need {describe(need)} on {store}{beside}, but {describe(free)} is available there: "
                         f"{remedy}")
