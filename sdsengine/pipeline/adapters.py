"""The only file that knows where models keep their decoder layers and linear weights.

Supported families: LLaMA-like (llama, which SmolLM2 and Llama 3 are; mistral, qwen2, qwen3, gemma; gemma2 and
gemma3_text, whose layers alternate sliding-window and full attention; phi3 with its fused qkv_proj and
gate_up_proj; olmo2, granite, cohere, starcoder2, stablelm, phi, persimmon), OPT, GPT-2, and GPT-NeoX, Falcon,
BLOOM and GPT-J with their own paths; and mixtures of experts (MOE_FAMILIES), whose fused experts experts.py
turns into linears while they are pruned. Each is tested end to end on a tiny model of its transformers config; a
family is added here only with such a test (a layer that runs differently would otherwise be pruned wrongly in
silence).
GPT-2 stores its projections as transformers' Conv1D with weight (in, out); everything else here sees
weights as (out, in), so the transpose happens in get_weight/set_weight only.
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from sdsengine import transformers_compat
from sdsengine.nn.convert import fused_banks

from . import experts

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    class Conv1D:  # nothing is an instance of it
        pass


@dataclass(frozen=True)
class Layout:
    layers: str  # attribute path of the decoder-layer ModuleList
    pre_layers: tuple[str, ...]  # modules that run before the first layer (moved for input capture)


_LLAMA_LIKE = Layout("model.layers", ("model.embed_tokens", "model.rotary_emb"))

# transformers-5 mixtures of experts whose layers live where LLaMA's do: their experts' 3-D banks are pruned as
# per-expert linears (experts.py), their routers left dense
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v3", "gpt_oss", "granitemoe",
                "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe")

LAYOUTS = {
    **{name: _LLAMA_LIKE for name in MOE_FAMILIES},
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                      "phi3", "olmo2", "granite", "cohere", "starcoder2", "stablelm", "phi",
                                      "persimmon")},
    "gpt_neox": Layout("gpt_neox.layers", ("gpt_neox.embed_in", "gpt_neox.rotary_emb")),
    "falcon": Layout("transformer.h", ("transformer.word_embeddings", "transformer.rotary_emb")),
    "bloom": Layout("transformer.h", ("transformer.word_embeddings", "transformer.word_embeddings_layernorm")),
    "gptj": Layout("transformer.h", ("transformer.wte", "transformer.rotary_emb")),
    "opt": Layout("model.decoder.layers", ("model.decoder.embed_tokens", "model.decoder.embed_positions",
                                            "model.decoder.project_in")),
    "gpt2": Layout("transformer.h", ("transformer.wte", "transformer.wpe")),
}


def layout_for(model) -> Layout:
    if not hasattr(model, "config"):  # a bare module, a path
        raise ValueError(f"sdsengine prunes Hugging Face causal language models (with a .config); got a "
                         f"{type(model).__name__}")
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in LAYOUTS:
        raise unsupported_layout(model_type, model)
    if model_type in MOE_FAMILIES and transformers_compat.major() < 5:
        # transformers 4 keeps experts as linears beside a linear router, which would be pruned, and routes the
        # two streams' tokens without telling which (experts.py needs the fused modules of transformers 5)
        import transformers
        raise ValueError(f"mixtures of experts ({model_type}) are pruned with transformers 5 or later; this is "
                         f"transformers {transformers.__version__}")
    return LAYOUTS[model_type]


def unsupported_layout(model_type, model=None) -> ValueError:
    """The error for a model type without a layout here; with the model, what in it is the obstacle."""
    note = "" if model is None else _fused_experts_note(model)
    return ValueError(f"unsupported model layout {model_type!r}{note}; supported: {', '.join(sorted(LAYOUTS))}")


def _fused_experts_note(model) -> str:
    """Why a mixture-of-experts model outside MOE_FAMILIES is refused: its experts' 3-D weights (experts, out, in)
    hold no nn.Linear, and how its layers route tokens to them is untested here. A convolution's kernel is 3-D
    too (Mamba's, RecurrentGemma's conv1d), and was called a mixture of experts: convolutions are passed over."""
    fused = next(iter(fused_banks(model).items()), None)
    if fused is None:
        return ""
    return (f" (a mixture-of-experts model whose experts' weights, fused 3-D parameters such as {fused[0]} of shape "
            f"{tuple(fused[1].shape)}, sdsengine has not been taught to prune; the mixtures it prunes: "
            f"{', '.join(MOE_FAMILIES)})")


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def decoder_layers(model) -> nn.ModuleList:
    return _get(model, layout_for(model).layers)


def pre_layer_modules(model):
    return [m for m in (_get(model, p) for p in layout_for(model).pre_layers) if m is not None]


def is_prunable(module) -> bool:
    return isinstance(module, nn.Linear) or isinstance(module, Conv1D)


def unprunable_weights(layer) -> dict[str, tuple]:
    """Matrix (or larger) parameters of a decoder layer that no prunable linear holds, name -> shape: fused expert
    banks not unfused (experts.unfused). Each would stay dense while the report, which counts linears, says the
    layer is pruned. A norm's scale is no matrix even where it is 2-D (Command R+ normalizes q and k per head:
    (heads, head_dim)); a router is left dense on purpose (experts.py)."""
    owned = {id(m.weight) for m in layer.modules() if is_prunable(m)}
    owned |= {id(p) for m in layer.modules() if "norm" in type(m).__name__.lower() for p in m.parameters()}
    routers = experts.router_names(layer)
    owned |= {id(p) for name, m in layer.named_modules() if experts.is_router(name, routers) for p in m.parameters()}
    return {name: tuple(p.shape) for name, p in layer.named_parameters() if p.dim() >= 2 and id(p) not in owned}


def linear_modules(layer) -> dict[str, nn.Module]:
    """Prunable linears of one decoder layer, by name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if is_prunable(m)}


def pruned_linears(layer) -> dict[str, nn.Module]:
    """The linears a method prunes: all but a mixture of experts' routers (experts.py says why)."""
    routers = experts.router_names(layer)
    return {name: m for name, m in linear_modules(layer).items() if not experts.is_router(name, routers)}


def get_weight(module) -> torch.Tensor:
    """The weight as (out_features, in_features)."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


def set_weight(module, weight):
    w = weight.T if isinstance(module, Conv1D) else weight
    module.weight.data.copy_(w.to(module.weight.dtype))


def layer_output(out) -> torch.Tensor:
    """Decoder layers return a tensor in some transformers versions and a tuple in others."""
    return out[0] if isinstance(out, (tuple, list)) else out


def max_positions(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return None


def check_seqlen(model, seqlen):
    limit = max_positions(model)
    if limit and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} exceeds the model's maximum of {limit} positions")


def check_ids(model, ids, what):
    """Token ids past the embedding (a tokenizer bigger than the model's) would fail deep in the forward
    with a bare IndexError, or on a GPU with a device-side assert. No ids: nothing to check (the callers name
    a text too short for its purpose)."""
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"{what} must lie in [0, {vocab}) (the model's vocabulary), got "
                         f"{int(ids.min())}..{int(ids.max())}")


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside the block (dropout in training mode makes every score random), and each
    of its modules back in the caller's mode after, whatever happens inside."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
