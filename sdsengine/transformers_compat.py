"""What differs between the transformers versions sdsengine supports (setup.py: 4.45 and later), and what
transformers does that a model outside from_pretrained must be given by hand."""
import copy
import functools
import re

import torch


@functools.lru_cache(maxsize=1)
def major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


def dtype_kwargs(dtype) -> dict:
    """The keyword that sets a model's dtype in from_pretrained / from_config: `dtype` from transformers 5
    (4.56 added it), `torch_dtype` before, where an unknown `dtype` would reach the model's constructor."""
    return {"dtype" if major() >= 5 else "torch_dtype": dtype}


def float32_names(model, dtype) -> set[str]:
    """Names of the parameters and buffers that transformers holds in float32 in a model like `model` (its class
    and config) loaded in `dtype`; empty for a model without a config. Where a cast of the whole model (model.to)
    or a loader of our own would make them `dtype`: router weights and score biases that lose too much in half
    precision (DeepSeek-V3's, GLM-4-MoE's, HunYuan-MoE's: in bfloat16 their routing changes), listed by the class
    (`_keep_in_fp32_modules_strict`, and `_keep_in_fp32_modules` in float16) or built in float32 by its
    constructor; and rotary frequencies. A skeleton of the model's config on the meta device says which (costs
    no memory)."""
    config = getattr(model, "config", None)
    if dtype == torch.float32 or config is None or not hasattr(type(model), "_from_config"):
        return set()
    try:
        with torch.device("meta"):
            skeleton = type(model)._from_config(copy.deepcopy(config), **dtype_kwargs(dtype))
        built = dict((*skeleton.named_parameters(), *skeleton.named_buffers()))
    except Exception:  # a class that cannot be built on the meta device: its lists alone say
        skeleton, built = model, {}
    tensors = {**dict((*model.named_parameters(), *model.named_buffers())), **built}
    listed = set(getattr(skeleton, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        listed |= set(getattr(skeleton, "_keep_in_fp32_modules", None) or ())
    # a listed name is a whole run of a tensor's name components ("gate.weight": mlp.gate.weight, not
    # mlp.shared_expert_gate.weight)
    pattern = re.compile("|".join(rf"(^|\.){re.escape(n)}($|\.)" for n in sorted(listed))) if listed else None
    return {name for name, t in tensors.items() if t.is_floating_point() and (
        name in built and t.dtype == torch.float32 or pattern is not None and pattern.search(name))}


def cast(model, dtype):
    """model.to(dtype) as from_pretrained would have loaded it in dtype: what transformers holds in float32
    (float32_names) keeps its float32 values, unrounded; returns the model."""
    keep = float32_names(model, dtype)
    kept = {name: t.data for name, t in (*model.named_parameters(), *model.named_buffers())
            if name in keep and t.dtype == torch.float32}
    model.to(dtype)
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if name in kept:
            t.data = kept[name]
    return model


def gguf_tokenizer(tokenizer, gguf_path):
    """The tokenizer transformers built from a GGUF file, as the file describes it and as it saves.

    Two older transformers differ from 5.24 on SmolLM2's GGUF (seen with 4.57 and 5.0; 5.10 and later
    agree with 5.24): they add a BOS token although the file says `tokenizer.ggml.add_bos_token` false (every
    calibration document and evaluation text then starts with one more token), and 5.0 builds a
    CodeLlamaTokenizer that saves under that class name and reloads with a different pre-tokenizer (a saved
    run's tokenizer then maps every space to the unknown token). Here the file's add_bos_token is applied,
    and the tokenizer becomes the plain fast one around the same `tokenizers` object: it encodes alike, and
    save_pretrained / from_pretrained give it back unchanged."""
    from transformers import PreTrainedTokenizerFast
    # only a tokenizer that adds a BOS is checked against the file: reading its metadata takes seconds (gguf
    # parses every token), and the versions that disagree add one where the file says not to
    if _adds_bos(tokenizer) and _gguf_field(gguf_path, "tokenizer.ggml.add_bos_token") is False:
        tokenizer.add_bos_token = False  # LlamaTokenizerFast and 5.0's CodeLlamaTokenizer rebuild their template
        if _adds_bos(tokenizer):
            raise ValueError(f"the tokenizer transformers built from {gguf_path} adds a BOS token against the "
                             "file's tokenizer.ggml.add_bos_token (false), and cannot be told otherwise")
    if type(tokenizer) is PreTrainedTokenizerFast:
        return tokenizer
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                    model_max_length=tokenizer.model_max_length,
                                    **{k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)})
    plain.chat_template = getattr(tokenizer, "chat_template", None)
    return plain


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def _gguf_field(path, key):
    """A scalar from a GGUF file's metadata, or None where the file does not hold it."""
    from gguf import GGUFReader
    field = GGUFReader(str(path)).fields.get(key)
    return None if field is None or not field.data else field.parts[field.data[0]][0].item()


def loading_names(model, keys) -> dict:
    """Checkpoint key -> the name of `model`'s tensor that transformers loads it into, for the keys among `keys` that it
    renames as it loads (transformers 5's conversion mapping, renames only: GPT-NeoX's embed_out is the model's
    lm_head); none where this transformers has no such mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        renamings = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
        renamed = {key: rename_source_key(key, renamings, [])[0] for key in keys}
    except (ImportError, TypeError, AttributeError):  # another transformers: none renamed (a missing name is refused)
        return {}
    return {key: name for key, name in renamed.items() if name != key}


def fused_sources(model, keys) -> dict:
    """The model's tensors that transformers 5 builds as it loads from several checkpoint tensors (a mixture's experts,
    stored one by one, fused into 3-D banks): name -> (its converter, {source pattern: the checkpoint keys among `keys`
    that it reads, in the loader's order}); none where this transformers has no such mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        found = {}
        for key in sorted(keys, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters)
            if pattern is not None:
                converter = next(c for c in converters if pattern in c.source_patterns)
                found.setdefault(name, (converter, {}))[1].setdefault(pattern, []).append(key)
    except (ImportError, TypeError, AttributeError, StopIteration):  # another transformers: none (refused as missing)
        return {}
    return found


def stacks_rows(converter) -> bool:
    """Whether `converter` builds its bank as every fused mixture's converter does (transformers 5.25): each source
    pattern's tensors stacked along a new first dimension (MergeModulelist, dim 0), and where there are several
    patterns, their stacks joined along the next (Concatenate, dim 1, in the patterns' order). Expert e's tensor of
    each pattern then fills rows of bank[e]."""
    steps = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    return steps in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def row_spans(converter, sources, shapes):
    """(pattern, its checkpoint keys (one per expert), start, stop) of each source pattern of a bank that
    stacks_rows builds: the rows of bank[e] that each pattern's tensor of expert e fills, in the converter's order, as
    many as its first expert's tensor's in `shapes` (key -> anything with a shape)."""
    row = 0
    for pattern in (p for p in converter.source_patterns if p in sources):
        keys = sources[pattern]
        start, row = row, row + shapes[keys[0]].shape[0]
        yield pattern, keys, start, row


def rows_split(converter, sources, shapes, parts) -> dict:
    """The checkpoint tensors (key -> tensor) a bank that stacks_rows builds from `sources` was built from, each a view
    of its rows of its expert's slice of the bank, parts[e]: what `reverted` gives, with no copy of the bank."""
    return {key: part[start:stop] for _, keys, start, stop in row_spans(converter, sources, shapes)
            for key, part in zip(keys, parts, strict=True)}


def reverted(model, tensors) -> dict:
    """The model's tensors ({name: tensor}) under the checkpoint's names, as save_pretrained writes them: transformers'
    conversion mapping reversed (a fused experts bank split back into each expert's tensors)."""
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, dict(tensors))


def fused(model, name, converter, tensors):
    """The model's tensor `name` built from its checkpoint tensors ({source pattern: [tensors]}) by `converter`'s
    operations, as transformers builds it on load."""
    for op in converter.operations:
        tensors = op.convert(tensors, source_patterns=converter.source_patterns,
                             target_patterns=converter.target_patterns, full_layer_name=name, model=model,
                             config=model.config)
    (tensor,) = tensors.values()
    return tensor
