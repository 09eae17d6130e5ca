"""Save a (possibly ZeRO-3 partitioned, possibly LoRA) model as a plain Hugging Face directory.

Saving never mutates the live model: parameters are gathered one at a time into a CPU state dict on
rank 0, LoRA deltas are folded into the base weights in that state dict, and the directory is written
atomically (temp dir + rename) with safetensors weights, config, generation config and tokenizer.
"""
import contextlib
import json
import os
import shutil

import torch

from training.utils import distributed
from training.utils.atomic_dir import atomic_directory, commit_set, set_staging_dir, start_set
from training.utils.lora import lora_scalings, lora_state_dict_to_fused


def gather_state_dict(model) -> dict[str, torch.Tensor] | None:
    """Full fp32-or-native CPU state dict on rank 0 (None elsewhere); every rank must call it."""
    import deepspeed

    wanted = set(model.state_dict().keys())
    state = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in wanted:
            continue
        partitioned = hasattr(tensor, "ds_id")
        with deepspeed.zero.GatheredParameters([tensor], enabled=partitioned):
            if distributed.is_rank_0():
                state[name] = tensor.detach().to("cpu", copy=True)
    if not distributed.is_rank_0():
        return None
    return lora_state_dict_to_fused(state, lora_scalings(model))


def save_hf_format(model, tokenizer, output_dir: str, *, extra_json: dict[str, dict] | None = None,
                   metrics=None, metrics_title: str = "") -> None:
    """Write `output_dir` as an HF model directory that `AutoModelForCausalLM.from_pretrained` loads.

    `model` is the bare module (engine.module). `extra_json` adds small JSON files (e.g. the run's
    arguments); `metrics` (a metrics_log.MetricsLog) adds the metrics history and a PNG of the curves.
    """
    state = gather_state_dict(model)
    write_model_directory(output_dir, tokenizer,
                          lambda tmp: model.save_pretrained(tmp, state_dict=state, safe_serialization=True),
                          extra_json=extra_json, metrics=metrics, metrics_title=metrics_title)


def write_model_directory(output_dir: str, tokenizer, write_weights, *, extra_json: dict[str, dict] | None = None,
                          metrics=None, metrics_title: str = "") -> None:
    """The part of every model save after gathering: rank 0 fills a temporary directory with
    `write_weights(tmp)`, the tokenizer, the `extra_json` files and the metrics, then renames it onto
    `output_dir`; every rank must call it (it ends with a barrier)."""
    if distributed.is_rank_0():
        with atomic_directory(output_dir, what="the model") as tmp:
            write_weights(tmp)
            tokenizer.save_pretrained(tmp)
            for name, content in (extra_json or {}).items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    json.dump(content, f, indent=1, default=str)
            if metrics is not None:
                metrics.write(tmp, metrics_title)
    distributed.barrier()


@contextlib.contextmanager
def saving_set(parent: str, members: tuple[str, ...]):
    """Save several model directories as one set (step 3's actor/, critic/, actor_ema/): yields a staging
    directory to save them into, then moves them into `parent` together (atomic_dir.commit_set). Every rank
    must enter it; a failure leaves `parent`'s earlier set untouched."""
    staging = set_staging_dir(parent)
    if distributed.is_rank_0():
        start_set(parent)
    distributed.barrier()
    try:
        yield staging
    except BaseException:
        if distributed.is_rank_0():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if distributed.is_rank_0():
        commit_set(parent, members)
    distributed.barrier()
