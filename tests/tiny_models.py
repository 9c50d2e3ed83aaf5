"""Tiny random models of each supported family, built from transformers configs (no hub needed).

Families newer than the oldest transformers setup.py admits are built by model type, and their tests skip
where the installed transformers does not know them."""
import json

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

from sdsengine.algorithms.stats import Hessian
from sdsengine.pipeline import adapters, experts

VOCAB = 96


def tiny_config(family):
    # grouped-query attention: 4 heads, 2 kv heads
    llama_like = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "qwen3":  # adds q/k norms
        return _by_type("qwen3", **llama_like, head_dim=16)
    if family == "mistral":
        return _by_type("mistral", **llama_like)
    if family == "gemma":  # scales the embeddings before layer 0; head_dim is its own setting
        return _by_type("gemma", **llama_like, head_dim=16)
    if family in ("gemma2", "gemma3"):  # layers alternate a sliding window (4 here, shorter than the windows
        # tests use) and full attention, each with its own mask
        return _by_type("gemma2" if family == "gemma2" else "gemma3_text", **llama_like, head_dim=16,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return _by_type("phi3", **llama_like, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("olmo2", "granite", "stablelm", "persimmon"):  # LLaMA-like; olmo2 norms after the attention and
        # MLP, granite scales embeddings, residuals and logits, stablelm and persimmon rotate part of each head
        return _by_type(family, **llama_like)
    if family == "cohere":  # a parallel block (attention and MLP read the same normed input); Command R+'s q and k
        # norms, per head, with 2-D weights (heads, head_dim)
        return _by_type(family, **llama_like, use_qk_norm=True)
    if family == "phi":  # a parallel block
        return _by_type(family, **llama_like)
    if family == "starcoder2":  # a plain MLP, c_fc and c_proj, with biases
        return _by_type(family, **llama_like)
    if family == "gpt_neox":  # fused query_key_value, parallel residual, under gpt_neox.layers
        return _by_type(family, **llama_like)
    if family == "falcon":  # fused query_key_value with grouped kv heads, parallel attention, under transformer.h
        return _by_type(family, **llama_like, num_kv_heads=2, new_decoder_architecture=True)
    if family == "bloom":  # ALiBi instead of positions, a norm after the embeddings
        return _by_type(family, vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    if family == "gptj":  # rotary on the first rotary_dim channels of each head, parallel attention and MLP
        return _by_type(family, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)
    if family in MOE_SETTINGS:  # mixtures of experts: 4 experts, 2 per token, their weights fused in 3-D parameters
        _skip_without_fused_experts()
        return _by_type(family, **llama_like, **MOE_SETTINGS[family])
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=64)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(family)


_DEEPSEEK_LIKE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                      first_k_dense_replace=1, n_group=1, topk_group=1)  # layer 0 a dense MLP, a shared expert
MOE_SETTINGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,  # a gated shared expert
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),  # its router an nn.Linear
    "deepseek_v3": dict(**_DEEPSEEK_LIKE, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,  # latent attention
                        qk_nope_head_dim=8, v_head_dim=16),
    "glm4_moe": dict(**_DEEPSEEK_LIKE, head_dim=16),
    # experts stored transposed with biases, gate and up interleaved and clamped; attention sinks
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),  # under block_sparse_moe, a router
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=16),  # its router's linear inside mlp.gate
    # not supported: experts fused in another way (every token through every expert, scaled before)
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, head_dim=16, intermediate_size_mlp=128),
}


# sdsengine prunes mixtures of experts as transformers 5 fuses them, and refuses them under transformers 4
# (test_experts.py checks the refusal): their tests skip there. The installed release itself, not
# transformers_compat.major(), which tests replace to check that refusal.
_NO_FUSED_EXPERTS = (f"mixtures of experts need transformers 5 or later, this is {transformers.__version__}"
                     if int(transformers.__version__.split(".")[0]) < 5 else None)
needs_fused_experts = pytest.mark.skipif(_NO_FUSED_EXPERTS is not None, reason=str(_NO_FUSED_EXPERTS))


def _skip_without_fused_experts():
    if _NO_FUSED_EXPERTS:
        pytest.skip(_NO_FUSED_EXPERTS)


def _by_type(model_type, **settings):
    try:
        return AutoConfig.for_model(model_type, **settings)
    except ValueError:
        pytest.skip(f"transformers here does not know {model_type!r}")


def tiny_model(family, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


def mixture_of_large_layers():
    """A Qwen3-MoE of 6 layers of 100 MiB in float32, random weights: memory tests measure in its layers."""
    _skip_without_fused_experts()
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=512, moe_intermediate_size=512, num_experts=32,
                            num_experts_per_tok=4, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                            head_dim=64, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config)


def mixture_or_skip(family):
    """The family's tiny model, skipped where transformers here gives it no experts sdsengine can unfuse: experts
    in another layout (GraniteMoE's input_linear/output_linear up to 5.12; fused like the rest from 5.13), or a
    router handing every expert's weight (PhiMoE and HunYuan-MoE in 5.0, refused by UnfusedExperts)."""
    model = tiny_model(family)
    fused = [m for m in model.modules() if experts.is_fused_experts(m)]
    if not fused:
        pytest.skip(f"transformers here keeps {family}'s experts in a layout other than the fused one")
    shapes = []

    def look(module, args, kwargs):
        index, weights = [*args, *kwargs.values()][1:3]
        shapes.append((index.shape[-1], weights.shape[-1]))

    hook = fused[0].register_forward_pre_hook(look, with_kwargs=True)
    try:
        with torch.no_grad():
            model(tiny_tokens(1, 4))
    finally:
        hook.remove()
    if any(k != w for k, w in shapes):
        pytest.skip(f"transformers here hands {family}'s experts every expert's routing weight (its own mixture wrong)")
    return model


def save_tiny_tokenizer(path):
    """A two-word tokenizer, enough for load_model to accept a saved tiny model."""
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                      "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                      "decoder": None, "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1},
                                                 "unk_token": "[UNK]"}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def tiny_tokens(nsamples=4, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=g)


def layer_outputs(model, samples):
    """Each decoder layer's output over the windows, from plain forward passes of the whole model, one
    window at a time (as the pipeline feeds them)."""
    seen = {i: [] for i in range(len(adapters.decoder_layers(model)))}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: seen[i].append(adapters.layer_output(out)))
             for i, layer in enumerate(adapters.decoder_layers(model))]
    try:
        with torch.no_grad():
            for j in range(samples.shape[0]):
                model(samples[j:j + 1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(seen[i]) for i in sorted(seen)]


def correlated_layer(out=24, inp=32, tokens=256, seed=0, mixing=0.3):
    """A weight and the Hessian statistics of correlated inputs (as real activations are; the more mixing,
    the more the choice of mask matters)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + mixing * torch.randn(inp, inp, generator=g))
    stats = Hessian(inp, "cpu")
    stats.add_batch(x)
    return w, stats
