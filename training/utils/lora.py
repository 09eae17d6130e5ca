"""LoRA layers laid out the way DeepSpeed's Hybrid Engine expects them.

The Hybrid Engine finds LoRA by duck typing (`deepspeed.module_inject.policy.maybe_get_lora`): a
module that owns `weight` ([out, in]) and also has `lora_right_weight` ([in, r]),
`lora_left_weight` ([r, out]) and a float `lora_scaling` is fused for generation with
`weight += lora_scaling * lora_left_weight.t() @ lora_right_weight.t()`. `LoRALinear` keeps exactly
that layout, and keeps the base `weight`/`bias` under their original names so checkpoints of the
base model load unchanged.

Scaling: DeepSpeed-Chat multiplies the low-rank update by a plain `lora_scaling` (default 1) rather
than PEFT's `lora_alpha / r`; we keep its flag semantics. `lora_scaling = alpha / r` gives the PEFT
convention.
"""
import math
from collections.abc import Iterable

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from training.utils.errors import UserInputError

LORA_PARAM_NAMES = ("lora_right_weight", "lora_left_weight")


def _full_shape(param: torch.Tensor) -> torch.Size:
    """The logical shape of a parameter; under ZeRO-3 `param.shape` is that of the local shard."""
    return param.ds_shape if hasattr(param, "ds_id") else param.shape


def _lora_delta(right: torch.Tensor, left: torch.Tensor, scaling: float) -> torch.Tensor:
    """The [out, in] update LoRA adds to the base weight (the Hybrid Engine's formula)."""
    return scaling * (left.t() @ right.t())


class LoRALinear(nn.Module):
    """`nn.Linear` plus a trainable low-rank update; the base weight and bias are frozen.

    Built around the existing base parameters (not copies), so a ZeRO-3 partitioned weight stays
    partitioned: only the small LoRA factors are allocated here, at full size, and ZeRO-3 partitions
    them when the engine is created.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, lora_dim: int,
                 lora_scaling: float = 1.0, lora_dropout: float = 0.0):
        super().__init__()
        if lora_dim <= 0:
            raise ValueError(f"lora_dim must be positive, got {lora_dim}")
        out_features, in_features = _full_shape(weight)
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False

        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_right_weight = nn.Parameter(torch.empty(in_features, lora_dim, **factory))
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, out_features, **factory))
        # Initialise the [in, r] factor as nn.Linear would a [r, in] weight (fan_in = in_features);
        # the zero left factor makes the update zero, so conversion does not change the model.
        nn.init.kaiming_uniform_(self.lora_right_weight.t(), a=math.sqrt(5))
        self.lora_scaling = float(lora_scaling)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.fuse_lora = False

    def _fusion_params(self):
        return [self.weight, self.lora_right_weight, self.lora_left_weight]

    @torch.no_grad()
    def fuse_lora_weight(self) -> None:
        """Fold the update into `weight` (for generation). A no-op when already fused.

        Under ZeRO-3 this gathers the weight, so every rank must call it.
        """
        if self.fuse_lora:
            return
        with deepspeed.zero.GatheredParameters(self._fusion_params(), modifier_rank=0):
            self.weight += _lora_delta(self.lora_right_weight, self.lora_left_weight,
                                       self.lora_scaling).to(self.weight.dtype)
        self.fuse_lora = True

    @torch.no_grad()
    def unfuse_lora_weight(self) -> None:
        """Take the update back out of `weight` (for training). A no-op when not fused."""
        if not self.fuse_lora:
            return
        with deepspeed.zero.GatheredParameters(self._fusion_params(), modifier_rank=0):
            self.weight -= _lora_delta(self.lora_right_weight, self.lora_left_weight,
                                       self.lora_scaling).to(self.weight.dtype)
        self.fuse_lora = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.fuse_lora:
            return out
        return out + (self.lora_dropout(x) @ self.lora_right_weight @ self.lora_left_weight) * self.lora_scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, lora_dim={self.lora_right_weight.shape[1]}, "
                f"lora_scaling={self.lora_scaling}, fused={self.fuse_lora}")


def _as_list(part_module_name: str | Iterable[str]) -> list[str]:
    return [part_module_name] if isinstance(part_module_name, str) else list(part_module_name)


def _no_match_error(model: nn.Module, parts: list[str]) -> UserInputError:
    """One line that shows the user what module names in this model actually look like."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    flag = f"--lora_module_name '{','.join(parts)}'"
    if not linear_names:
        examples = [n for n, _ in model.named_modules() if n][:5]
        return UserInputError(f"{flag}: {type(model).__name__} has no nn.Linear layer to convert "
                              f"(modules look like: {', '.join(examples)}); run without --lora_dim")
    return UserInputError(f"{flag} matches no nn.Linear in {type(model).__name__}; "
                          f"module names look like: {', '.join(linear_names[:5])}")


def convert_linear_layer_to_lora(model: nn.Module, part_module_name: str | list[str], lora_dim: int,
                                 lora_scaling: float = 1.0, lora_dropout: float = 0.0) -> nn.Module:
    """Replace, in place, every nn.Linear whose qualified name contains one of `part_module_name`.

    `lora_dim <= 0` means LoRA is off (DeepSpeed-Chat's default) and returns the model unchanged.
    Works on ZeRO-3 partitioned models without gathering (the base parameters are reused).
    """
    if lora_dim <= 0:
        return model
    parts = _as_list(part_module_name)
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and any(p in name for p in parts)]
    if not targets:
        raise _no_match_error(model, parts)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        setattr(parent, child_name, LoRALinear(linear.weight, linear.bias, lora_dim, lora_scaling, lora_dropout))
    return model


def only_optimize_lora_parameters(model: nn.Module, force_optimize_params: Iterable[str] = ()) -> nn.Module:
    """Train only the LoRA factors, plus parameters whose name contains a `force_optimize_params` entry.

    The reward model/critic forces its value head ("v_head"), which is new and must learn.
    """
    forced = tuple(force_optimize_params)
    for name, param in model.named_parameters():
        param.requires_grad = any(k in name for k in LORA_PARAM_NAMES + forced)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserInputError("--only_optimize_lora leaves nothing to train: set --lora_dim > 0 "
                             "with a --lora_module_name that matches the model")
    return model


def make_model_gradient_checkpointing_compatible(model: nn.Module) -> nn.Module:
    """Make the embedding output require grad, so gradients reach LoRA inside checkpointed blocks.

    With only LoRA trainable, the embeddings are frozen and their output has no grad. Reentrant
    activation checkpointing (torch's `use_reentrant=True`, DeepSpeed's checkpointing) only
    back-propagates through a checkpointed block when one of its tensor inputs requires grad, so
    without this the LoRA factors inside those blocks silently get no gradient.
    """
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return model

    def make_output_require_grad(_module, _inputs, output):
        output.requires_grad_(True)

    embeddings = (model.get_input_embeddings() if hasattr(model, "get_input_embeddings")
                  else next(m for m in model.modules() if isinstance(m, nn.Embedding)))
    embeddings.register_forward_hook(make_output_require_grad)
    return model


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def fuse_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (idempotent; collective under ZeRO-3)."""
    for _, module in _lora_modules(model):
        module.fuse_lora_weight()
    return model


def unfuse_lora(model: nn.Module) -> nn.Module:
    """Undo `fuse_lora` (idempotent; collective under ZeRO-3)."""
    for _, module in _lora_modules(model):
        module.unfuse_lora_weight()
    return model


def count_lora_modules(model: nn.Module) -> int:
    return len(_lora_modules(model))


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """{module prefix: lora_scaling} for `lora_state_dict_to_fused`.

    Refuses a fused module: its weight already holds the update, which saving would add twice.
    """
    fused = [name for name, m in _lora_modules(model) if m.fuse_lora]
    if fused:
        raise RuntimeError(f"LoRA modules are fused ({fused[0]}, ...): call unfuse_lora(model) before saving")
    return {name: m.lora_scaling for name, m in _lora_modules(model)}


def lora_state_dict_to_fused(state_dict: dict[str, torch.Tensor],
                             scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A plain-model state dict from a LoRA model's (gathered) state dict; the input is not modified.

    Each `<prefix>.weight` gets its LoRA update added (computed in fp32, stored in the weight's
    dtype) and every `lora_*` key is dropped, so the result loads into the unconverted model class.
    Working on a state dict, not the live model, means saving never mutates training weights and
    works the same on ZeRO-3 gathered copies. `scalings` comes from `lora_scalings(model)`; its
    prefixes must match the state dict's keys.
    """
    suffix = ".lora_right_weight"
    fused = {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in LORA_PARAM_NAMES}
    for key in state_dict:
        if not key.endswith(suffix):
            continue
        prefix = key[: -len(suffix)]
        weight = state_dict[f"{prefix}.weight"]
        delta = _lora_delta(state_dict[key].float(), state_dict[f"{prefix}.lora_left_weight"].float(),
                            scalings[prefix])
        fused[f"{prefix}.weight"] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    return fused
