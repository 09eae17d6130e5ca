"""Decoding steps without transformers' per-call machinery: one new token per row over a block KV cache.

A decoding step of a small model on CPU is mostly fixed costs: transformers' forward goes through decorators,
output capturing, a causal-mask builder, cache bookkeeping and output classes in every layer of every step
(measured on one thread of a Xeon: a 6-layer OPT with 64-wide layers, where the matmuls cost nothing, still took
2.7-3.3 ms per decoded token; the same step written out, 2.0 ms). Without it, a batch of 8 x (192 + 128) tokens of
tiny/opt-20m decodes ~5% faster (1.74 -> 1.66 s, alternated runs, the same tokens).

`lean_forward(model)` returns a replacement for the causal LM's `forward` that runs such a step itself, with the
model's own modules (norms, projections, MLP, rotary embedding) and its own attention function (the one transformers
would call for the model's attention implementation), in transformers' order of operations, so the logits are
bitwise those of the model's forward (tests/test_lean_decode.py); every other call goes to the model's forward.
A step is taken over when it is exactly what `generate` sends while decoding: input_ids [B, 1], the 2-D attention
mask of every position so far (or none: no padding), their position ids, a block KV cache (model.kv_cache) holding
all earlier positions, nothing else. Every call over a block cache gets a 2-D mask: transformers' SDPA path leaves
out the mask of a one-token query when nothing is padded, which over a block buffer would attend to its unused tail.

Architectures: OPT, and the Llama family (Llama, Qwen2), the block cache's (kv_cache.BLOCK_CACHE_MODEL_TYPES).
Used by sampling.decoding_kernels (bf16/fp16 on CPU; RLHF_DECODING_KERNELS=0 turns it off with the rest).
"""
import functools
import sys

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from training.utils.model.decode_attention import kernel_applies, kernel_attention
from training.utils.model.kv_cache import BlockKVLayer, cache_kwarg
from training.utils.model.last_layer import llama_after_attention, opt_after_attention

# The kwargs generate passes to a decoding step (anything else goes to the model's own forward).
_STEP_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "logits_to_keep", "use_cache", "return_dict",
                          "cache", "past_key_values"})
LLAMA_FAMILY = frozenset({"llama", "qwen2"})
LEAN_MODEL_TYPES = LLAMA_FAMILY | {"opt"}


def lean_forward(model):
    """A `forward` for `model` (a causal LM) that runs decoding steps itself and hands every other call to the
    model's own forward; None for an architecture without a lean step or a ZeRO-3 partitioned model. It has the
    model forward's signature, as generate reads it to decide what to pass (position ids, the mask)."""
    model_type = model.config.model_type
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        return None  # ZeRO-3 gathers partitioned parameters module by module, in the order it traced them
    if model_type == "opt":
        layer_step, embed = _opt_layer, _opt_embed
    elif model_type in LLAMA_FAMILY:
        layer_step, embed = _llama_layer, _llama_embed
    else:
        return None
    original = model.forward
    cache_name = cache_kwarg(model)
    modeling = sys.modules[type(model).__module__]  # the module-level functions transformers' own forward calls
    use_kernel = []  # decided at the first decoding step (the attention implementation is switched by then)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        cache, ids = kwargs.get(cache_name), kwargs.get("input_ids")
        if args or not _holds_block_cache(model, cache):
            return original(*args, **kwargs)
        if kwargs.get("attention_mask") is None and ids is not None:
            # generate drops a mask of all ones; transformers' SDPA path would then attend over the block buffers'
            # unused tail (it leaves out the mask of a one-token query), so every call over them gets one
            kwargs["attention_mask"] = ids.new_ones(ids.size(0), cache.layers[0].length + ids.size(1))
        if not _is_decoding_step(model, kwargs, cache):
            return original(*args, **kwargs)
        past, mask_2d = cache.layers[0].length, kwargs["attention_mask"]
        hidden, context = embed(model, ids, mask_2d, kwargs.get("position_ids"), past, modeling)
        capacity = cache.layers[0].get_mask_sizes(1)[0]  # the buffers' width once this step's position is in
        mask = _attention_mask(model, mask_2d, capacity, hidden.dtype)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation,
                                                          modeling.eager_attention_forward)
        if not use_kernel:
            use_kernel.append(kernel_applies(model))
        if use_kernel[0]:
            attention = kernel_attention(attention)
        for layer, cache_layer in zip(_decoder(model).layers, cache.layers):
            hidden = layer_step(layer, hidden, cache_layer, mask, attention, context)
        logits = _head(model, hidden)
        return CausalLMOutputWithPast(logits=logits, **{cache_name: cache})
    return forward


def _decoder(model):
    return model.model.decoder if model.config.model_type == "opt" else model.model


def _holds_block_cache(model, cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and len(layers) == len(_decoder(model).layers) and all(
        type(layer) is BlockKVLayer and layer.is_initialized for layer in layers)


def _is_decoding_step(model, kwargs, cache) -> bool:
    """What generate sends while decoding: one new token per row, the mask of all positions (and their position ids),
    a block cache holding every earlier position, the logits of that token."""
    ids, mask, positions = kwargs.get("input_ids"), kwargs["attention_mask"], kwargs.get("position_ids")
    length = cache.layers[0].length
    return (_STEP_KWARGS.issuperset(kwargs) and ids is not None and ids.dim() == 2 and ids.size(1) == 1
            and mask.dim() == 2 and mask.size(1) == length + 1 and all(layer.length == length for layer in cache.layers)
            and (positions is None or (positions.dim() == 2 and positions.size(1) == 1))
            and type(kwargs.get("logits_to_keep", 0)) is int and not torch.is_grad_enabled() and not model.training
            and kwargs.get("return_dict") is not False and kwargs.get("use_cache") is not False)


def _attention_mask(model, attention_mask: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, capacity]: the new token sees every real position so far, not padding nor the cache's unused tail;
    boolean for SDPA, additive (0 / the dtype's minimum) for eager attention, as transformers' mask builders give."""
    allowed = F.pad(attention_mask.bool(), (0, capacity - attention_mask.size(1)))[:, None, None, :]
    if model.config._attn_implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype), torch.finfo(dtype).min)


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    if model.config.model_type == "opt":
        decoder = model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return model.lm_head(hidden).contiguous()
    return model.lm_head(model.model.norm(hidden))


def _opt_embed(model, input_ids, attention_mask, positions, past: int, modeling):
    """OPT: token embedding + learned position of the new token (given, or counted over the mask's real positions)."""
    decoder = model.model.decoder
    if positions is None:
        positions = (attention_mask.cumsum(dim=1)[:, past:] * attention_mask[:, past:] - 1).long()
    hidden = decoder.embed_tokens(input_ids)
    position_embeddings = decoder.embed_positions(attention_mask, past, position_ids=positions)
    if decoder.project_in is not None:
        hidden = decoder.project_in(hidden)
    return hidden + position_embeddings, None


def _opt_layer(layer, hidden, cache_layer: BlockKVLayer, mask, attention, context):
    batch, width = hidden.shape[:2]
    attn = layer.self_attn
    residual = hidden
    if layer.do_layer_norm_before:
        hidden = layer.self_attn_layer_norm(hidden)
    heads = (batch, -1, attn.num_heads, attn.head_dim)
    query = (attn.q_proj(hidden) * attn.scaling).view(heads).transpose(1, 2)
    key, value = (proj(hidden).view(heads).transpose(1, 2) for proj in (attn.k_proj, attn.v_proj))
    keys, values = cache_layer.update(key, value)
    out, _ = attention(attn, query, keys, values, mask, dropout=0.0, scaling=1.0)
    return opt_after_attention(layer, residual, attn.out_proj(out.reshape(batch, width, -1).contiguous()))


def _llama_embed(model, input_ids, attention_mask, positions, past: int, modeling):
    """Llama family: token embedding; the rotary cos/sin of the new token's position (given, or `past` as
    transformers' forward counts without position ids), and the model's apply_rotary_pos_emb."""
    hidden = model.model.embed_tokens(input_ids)
    if positions is None:
        positions = (torch.arange(input_ids.size(1), device=input_ids.device) + past).unsqueeze(0)
    return hidden, (model.model.rotary_emb(hidden, position_ids=positions), modeling.apply_rotary_pos_emb)


def _llama_layer(layer, hidden, cache_layer: BlockKVLayer, mask, attention, context):
    (cos, sin), apply_rotary = context
    attn = layer.self_attn
    residual = hidden
    hidden = layer.input_layernorm(hidden)
    heads = (*hidden.shape[:-1], -1, attn.head_dim)
    query, key, value = (proj(hidden).view(heads).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    query, key = apply_rotary(query, key, cos, sin)
    keys, values = cache_layer.update(key, value)
    extra = {"sliding_window": attn.sliding_window} if hasattr(attn, "sliding_window") else {}
    out, _ = attention(attn, query, keys, values, mask, dropout=0.0, scaling=attn.scaling, **extra)
    return llama_after_attention(layer, residual, attn.o_proj(out.reshape(*hidden.shape[:-1], -1).contiguous()))
