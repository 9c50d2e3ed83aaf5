"""A loaded mixture of experts saved as save_pretrained saves it, without the copies save_pretrained makes.

transformers 5 holds a mixture's experts fused, one 3-D bank per projection, and save_pretrained splits every bank back
into the experts' tensors the checkpoint held, the whole state dict at once: the step that parts gate from up copies
every gate_up bank (3 GiB of a 5 GiB Qwen3-30B-shaped model, all held at once). Where a bank is built as
transformers 5.25 builds every fused mixture's (stacked and joined: transformers_compat.stacks_rows), each expert's
tensor is its rows of the bank, so it is written from a view, a tensor at a time (tensorfiles.write_safetensors), under
the names, in the dtypes and with the values save_pretrained writes. Any other model (none of those banks; quantized,
with adapters, offloaded, or of remote code) is saved by save_pretrained, as before.
"""
import warnings

import torch

from sdsengine import transformers_compat
from sdsengine.tensorfiles import SINGLE, held, write_index, write_safetensors

SHARD_BYTES = 50 * 10 ** 9  # save_pretrained's default max_shard_size, "50GB"


def checkpoint_entries(model):
    """The entries [(checkpoint name, dtype, shape, make)] of every tensor save_pretrained would write for `model`, each
    expert's tensor of a stacked-and-joined bank a view of its rows; None where save_pretrained must write them. This
    comes at the end of a run that may have taken hours: where transformers' internals are not what it expects (another
    release), it says so and leaves the save to save_pretrained rather than fail."""
    try:
        return _entries(model)
    except Exception as exc:  # nothing is written yet, and save_pretrained writes the same checkpoint
        warnings.warn(f"the experts' tensors could not be laid out as transformers saves them ({type(exc).__name__}: "
                      f"{exc}): saved by save_pretrained, which copies every bank")
        return None


def _entries(model):
    try:
        from transformers.modeling_utils import PreTrainedModel, remove_tied_weights_from_state_dict
    except ImportError:  # transformers 4: no fused banks
        return None
    if not isinstance(model, PreTrainedModel):  # a model of another library: its own save_pretrained
        return None
    state = model.state_dict()
    if _needs_save_pretrained(model, state):
        return None
    state = remove_tied_weights_from_state_dict(state, model)
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    layout = transformers_compat.reverted(model, {name: t.to("meta") for name, t in state.items()})
    banks = {name: built for name, built in transformers_compat.fused_sources(model, layout).items()
             if name in state and transformers_compat.stacks_rows(built[0])}
    if not banks:
        return None
    tensors = transformers_compat.reverted(model, {name: t for name, t in state.items() if name not in banks})
    for name, (converter, sources) in banks.items():
        tensors.update(transformers_compat.rows_split(converter, sources, layout, list(state[name])))
    if tensors.keys() != layout.keys():  # this transformers reverts otherwise than its conversion mapping reads
        warnings.warn("the experts' tensors are not where transformers' own save puts them: saved by save_pretrained, "
                      "which copies every bank")
        return None
    return held(tensors.items())


def write_shards(directory, entries, shard_bytes=SHARD_BYTES):
    """Write entries as save_pretrained names its files: one model.safetensors, or shards of at most shard_bytes (one
    larger tensor alone) and their index."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = entry[1].itemsize * torch.Size(entry[2]).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        write_safetensors(directory / SINGLE, shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(directory / file, shard)
        weight_map.update(dict.fromkeys((name for name, *_ in shard), file))
    write_index(directory, weight_map, total)


def _needs_save_pretrained(model, state) -> bool:
    """What only save_pretrained writes: a quantized model's state, adapters in PEFT's format, the files of remote code
    (a model class not of transformers), an offloaded model's tensors (on the meta device here, their values held by
    accelerate's hooks)."""
    return (getattr(model, "hf_quantizer", None) is not None or getattr(model, "_hf_peft_config_loaded", False)
            or not type(model).__module__.startswith("transformers.") or any(t.is_meta for t in state.values()))
