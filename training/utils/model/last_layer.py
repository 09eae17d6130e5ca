"""The last decoder layer computed only where a pass reads its output.

A step-3 pass reads the last layer's output at a suffix of each row only: the actor's and the reference's
log-probs at the answer positions, the critic's values from the last prompt token on, the reward model's score at
each answer's end. Every layer still needs every position's keys and values, but after its attention the last
layer's work at the other positions (the residual, the second norm, the MLP: two thirds of a layer's matmuls) feeds
nothing. Inside `last_layer_from(model, start)` the last layer runs its attention over the whole row and the rest
from `start` on; the earlier positions leave it as they entered (finite values that no loss or score reads). The
kept positions get the values of the full layer (a layer is row-wise after its attention; tests/test_last_layer.py
compares logits, values and gradients with the full forward).

    with last_layer_from(model, start):   # a no-op where it does not apply
        logits = model(input_ids, ..., logits_to_keep=width - start).logits

Applies to OPT, Llama and Qwen2 decoder layers, in passes without dropout after the attention (OPT's residual
dropout in training mode would draw its mask for fewer positions) and without activation checkpointing (its
recomputation runs the layer's own forward). Only callers that read positions >= start may use it.
RLHF_LAST_LAYER_SUFFIX=0 turns it off.
"""
import contextlib

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.opt.modeling_opt import OPTDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from training.utils.errors import env_switch
from training.utils.model.build import unwrap_model

LAYER_TYPES = (OPTDecoderLayer, LlamaDecoderLayer, Qwen2DecoderLayer)


def opt_after_attention(layer: OPTDecoderLayer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """OPT's layer after its attention (dropout off): `residual` its input, `attended` its attention's output, at the
    same positions (also lean_decode's decoding steps)."""
    hidden = residual + attended
    if not layer.do_layer_norm_before:
        hidden = layer.self_attn_layer_norm(hidden)
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    residual = hidden
    if layer.do_layer_norm_before:
        hidden = layer.final_layer_norm(hidden)
    hidden = (residual + layer.fc2(layer.activation_fn(layer.fc1(hidden)))).view(shape)
    return hidden if layer.do_layer_norm_before else layer.final_layer_norm(hidden)


def llama_after_attention(layer, residual: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """Llama's / Qwen2's layer after its attention, as opt_after_attention."""
    hidden = residual + attended
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _suffix_forward(layer, start: int):
    """`layer`'s forward computing its output from position `start` on (see the module docstring)."""
    is_opt = isinstance(layer, OPTDecoderLayer)
    own_forward = type(layer).forward

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        if args or hidden_states.dim() != 3 or hidden_states.size(1) <= start or not _dropout_free(layer):
            return own_forward(layer, hidden_states, *args, **kwargs)
        if is_opt:
            kwargs.pop("use_cache", None)  # OPT's layer does not pass it on to its attention
            normed = layer.self_attn_layer_norm(hidden_states) if layer.do_layer_norm_before else hidden_states
        else:
            normed = layer.input_layernorm(hidden_states)
        attended, _ = layer.self_attn(hidden_states=normed, **kwargs)
        rest = opt_after_attention if is_opt else llama_after_attention
        kept = rest(layer, hidden_states[:, start:], attended[:, start:])
        return torch.cat([hidden_states[:, :start], kept], dim=1)
    return forward


def _dropout_free(layer) -> bool:
    return not (layer.training and getattr(layer, "dropout", 0.0))


def _last_decoder_layer(model) -> torch.nn.Module | None:
    layers = [module for module in unwrap_model(model).modules() if type(module) in LAYER_TYPES]
    return layers[-1] if layers else None


@contextlib.contextmanager
def last_layer_from(model, start: int):
    """Inside the block, `model`'s last decoder layer computes its output at positions >= `start` only (see the
    module docstring); a no-op for start <= 0, other architectures, activation checkpointing, a layer whose forward
    is already replaced, and RLHF_LAST_LAYER_SUFFIX=0."""
    layer = _last_decoder_layer(model) if start > 0 and env_switch("RLHF_LAST_LAYER_SUFFIX") else None
    if layer is None or "forward" in vars(layer) or getattr(layer, "gradient_checkpointing", False):
        yield
        return
    layer.forward = _suffix_forward(layer, start)
    try:
        yield
    finally:
        del layer.forward

