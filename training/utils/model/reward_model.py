"""The reward model (and PPO critic): a decoder body with a scalar value head, scored at the last real token.

Score position. `values[b, t]` is the head applied to every position's last hidden state; a sequence's
score is its value at the last position whose attention mask is 1. With the data convention
(data/conversation.py) that is the EOS id closing the reply, the token step 1 trained and step 3
generates. The position comes from the mask, never from comparing ids with pad, and position ids are
counted from the mask too, so right padding, left padding and a batch of one give the same score, and
a pad == EOS tokenizer is handled.

On-disk format (written by `save_reward_model`, read by `load_reward_model`): one directory with

    config.json, model.safetensors   the backbone as a plain Hugging Face *base* model: the body's keys,
                                      as `AutoModel.from_pretrained(dir)` expects them (no LM head)
    tokenizer files                   the full tokenizer, special tokens included
    value_head.safetensors            {"v_head.weight": [1, H]}
    reward_model.json                 {"format": "rlhf-chat/reward-model", "version": 1,
                                       "score_position": "last_real_token",
                                       "end_token": <EOS text>, "end_token_id": <EOS id>,
                                       "value_head": {"in_features": H},
                                       "reward_stats": {"mean": ..., "std": ..., "accuracy": ..., ...}}
    + any extra JSON files and the metrics history of the run

Weights are safetensors only; pickle files are refused, never loaded. `reward_stats` (the scores'
distribution on the eval split) lets step 3 normalise rewards.

ZeRO-3: the backbone is built by `create_hf_model`, partitioned as it is created (under an
`HfDeepSpeedConfig` registered for that build only). The value head is a plain parameter until
then; DeepSpeed partitions it (broadcasting rank 0's copy) at initialize. Saving gathers one
parameter at a time; loading the head gathers it if it is partitioned. No code here reads a
parameter's shape or data outside a gather.
"""
import inspect
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from training.utils.data.pair_packing import unpack_pairs
from training.utils.errors import UserInputError
from training.utils.masks import last_real_token_index, positions_from_mask
from training.utils.model.attention import SEGMENTS_KWARG
from training.utils.model.build import REWARD_META_FILE, create_hf_model
from training.utils.model.save import gather_state_dict, write_model_directory

FORMAT = "rlhf-chat/reward-model"
FORMAT_VERSION = 1
SCORE_POSITION = "last_real_token"
META_FILE = REWARD_META_FILE
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_KEY = "v_head.weight"
BACKBONE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
BACKBONE_PREFIX = "backbone."
# reward_model.json entries the loaders read (dotted: nested), with their JSON types.
META_FIELDS = {"end_token_id": int, "value_head.in_features": int}


@dataclass
class RewardOutput:
    values: torch.Tensor  # [B, T] fp32: the value head at every position (the critic's values)
    end_scores: torch.Tensor  # [B] fp32: the value at each row's last real token (the reward)


def value_head_width(config) -> int:
    """Width of the body's last hidden state. OPT projects its output to `word_embed_proj_dim` (equal
    to hidden_size when it has no project_out); the other families use hidden_size (GPT-2's n_embd
    is reachable under that name through its config's attribute_map)."""
    return getattr(config, "word_embed_proj_dim", None) or config.hidden_size


class RewardModel(nn.Module):
    """`backbone` (an `AutoModel` body) + `v_head`, a bias-free linear map from hidden state to a scalar."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.v_head = nn.Linear(value_head_width(backbone.config), 1, bias=False)
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    @property
    def config(self):
        return self.backbone.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing_disable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False,
                position_ids: torch.Tensor | None = None, packed_source: torch.Tensor | None = None,
                unpacked_mask: torch.Tensor | None = None, attention_segments=None) -> RewardOutput:
        """Values and end scores of padded rows; or, given packed rows (a 4-D mask, their `position_ids`, and
        the `packed_source` / `unpacked_mask` of data.pair_packing), those of the plain rows they hold.
        `attention_segments` goes to the backbone's attention (model.attention)."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        extra = {"position_ids": position_ids} if self._takes_position_ids else {}
        if attention_segments is not None:
            extra[SEGMENTS_KWARG] = attention_segments
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                               **extra).last_hidden_state
        values = self.v_head(hidden).squeeze(-1).float()
        if packed_source is not None:
            values, attention_mask = unpack_pairs(values, packed_source), unpacked_mask
        end = last_real_token_index(attention_mask).unsqueeze(1)
        return RewardOutput(values=values, end_scores=values.gather(1, end).squeeze(1))


def is_reward_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_FILE))


def create_reward_model(model_name_or_path: str, tokenizer, *, ds_config: dict | None = None,
                        dropout: float | None = None, trust_remote_code: bool = False) -> RewardModel:
    """A reward model on a tiny config, a local HF directory (e.g. step 1's causal LM: only its body is
    loaded) or a hub id, with a fresh value head; or, given a saved reward model directory, that
    reward model whole (step 3 builds its critic and reward model this way)."""
    from transformers import AutoModel

    if is_reward_model_dir(model_name_or_path):
        return _load_saved(model_name_or_path, tokenizer, read_reward_model_meta(model_name_or_path),
                           ds_config=ds_config, dropout=dropout, trust_remote_code=trust_remote_code)
    backbone = create_hf_model(model_name_or_path, tokenizer, ds_config=ds_config, dropout=dropout,
                               trust_remote_code=trust_remote_code, model_class=AutoModel)
    return RewardModel(backbone)


def load_reward_model(path: str, *, ds_config: dict | None = None, dropout: float | None = None,
                      trust_remote_code: bool = False, add_eot_token: bool = False,
                      eot_token: str | None = None) -> tuple[RewardModel, object, dict]:
    """(model, tokenizer, the reward_model.json dict) from a directory `save_reward_model` wrote
    (`add_eot_token`, `eot_token`: tokenizer.load_tokenizer's)."""
    from training.utils.tokenizer import DEFAULT_EOS, load_tokenizer

    meta = read_reward_model_meta(path)
    tokenizer = load_tokenizer(path, add_eot_token, eot_token or DEFAULT_EOS, trust_remote_code)
    model = _load_saved(path, tokenizer, meta, ds_config=ds_config, dropout=dropout,
                        trust_remote_code=trust_remote_code)
    return model, tokenizer, meta


def read_reward_model_meta(path: str) -> dict:
    """reward_model.json, checked to be a format and score position this code reads."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        pickle_note = ("; its pickle weights (*.bin, e.g. DeepSpeed-Chat's pytorch_model.bin) are never loaded"
                       if os.path.isdir(path) and any(n.endswith(".bin") for n in os.listdir(path)) else "")
        raise UserInputError(f"'{path}' is not a reward model directory (no {META_FILE}{pickle_note}): "
                             "pass the --output_dir of step 2")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"'{meta_path}' is not valid JSON ({err}): the reward model directory is damaged; "
                             "copy it again or re-run step 2") from None
    if not isinstance(meta, dict):
        raise UserInputError(f"'{meta_path}' holds a JSON {type(meta).__name__}, not an object: the reward model "
                             "directory is damaged; copy it again or re-run step 2")
    found = (meta.get("format"), meta.get("version"), meta.get("score_position"))
    if found != (FORMAT, FORMAT_VERSION, SCORE_POSITION):
        raise UserInputError(f"'{meta_path}' describes (format, version, score_position) = {found}, this code "
                             f"reads {(FORMAT, FORMAT_VERSION, SCORE_POSITION)}: retrain the reward model with "
                             "this version of step 2")
    missing = [key for key, kind in META_FIELDS.items() if not _has_type(meta, key, kind)]
    if missing:
        raise UserInputError(f"'{meta_path}' lacks {', '.join(missing)} (or holds the wrong type there): the reward "
                             "model directory is damaged or hand-edited; copy it again or re-run step 2")
    return meta


def _has_type(meta: dict, dotted_key: str, kind) -> bool:
    value = meta
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_weight_files(path: str) -> None:
    names = set(os.listdir(path))
    if VALUE_HEAD_FILE in names and any(n in names for n in BACKBONE_WEIGHT_FILES):
        return
    if any(n.endswith(".bin") for n in names):
        raise UserInputError(f"reward model directory '{path}' holds pickle weights (*.bin), which are never "
                             "loaded: save it with save_reward_model, which writes safetensors")
    raise UserInputError(f"reward model directory '{path}' lacks model.safetensors or {VALUE_HEAD_FILE}: "
                         "it is incomplete; pass the --output_dir of a finished step 2 run")


def _load_saved(path: str, tokenizer, meta: dict, *, ds_config: dict | None, dropout: float | None,
                trust_remote_code: bool) -> RewardModel:
    from transformers import AutoModel

    _check_weight_files(path)
    if meta["end_token_id"] != tokenizer.eos_token_id:
        raise UserInputError(f"reward model '{path}' scores at end token {meta['end_token']!r} (id "
                             f"{meta['end_token_id']}) but the tokenizer's EOS is {tokenizer.eos_token!r} (id "
                             f"{tokenizer.eos_token_id}): use the tokenizer (and --add_eot_token/--eot_token) "
                             "of step 2")
    backbone = create_hf_model(path, tokenizer, ds_config=ds_config, dropout=dropout,
                               trust_remote_code=trust_remote_code, model_class=AutoModel)
    model = RewardModel(backbone)
    _load_value_head(model, path, meta)
    return model


def _load_value_head(model: RewardModel, path: str, meta: dict) -> None:
    import deepspeed
    from safetensors.torch import load_file

    weight = load_file(os.path.join(path, VALUE_HEAD_FILE)).get(VALUE_HEAD_KEY)
    width = model.v_head.in_features
    if weight is None or tuple(weight.shape) != (1, width) or meta["value_head"]["in_features"] != width:
        found = None if weight is None else tuple(weight.shape)
        raise UserInputError(f"'{path}/{VALUE_HEAD_FILE}' must hold {VALUE_HEAD_KEY} of shape (1, {width}) for "
                             f"this backbone, found {found}: the directory mixes files of different models; "
                             "save it again with step 2")
    param = model.v_head.weight
    # Under ZeRO-3 every rank gathers; rank 0's copy is the one kept when it is partitioned again.
    gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id"))
    with gathered, torch.no_grad():
        param.copy_(weight)


def reward_model_meta(model: RewardModel, tokenizer, reward_stats: dict) -> dict:
    """The reward_model.json content: the format, where the score sits, and the score statistics."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "score_position": SCORE_POSITION,
            "end_token": tokenizer.eos_token, "end_token_id": tokenizer.eos_token_id,
            "value_head": {"in_features": model.v_head.in_features}, "reward_stats": reward_stats}


def save_reward_model(model: RewardModel, tokenizer, output_dir: str, *, reward_stats: dict,
                      extra_json: dict[str, dict] | None = None, metrics=None, metrics_title: str = "") -> None:
    """Write the directory described in the module docstring; every rank must call it.

    `model` is the bare module (engine.module). Parameters are gathered (ZeRO-3) and LoRA updates
    folded in on rank 0 without touching the live model; the directory is replaced atomically.
    """
    from safetensors.torch import save_file

    state = gather_state_dict(model)
    meta = reward_model_meta(model, tokenizer, reward_stats)

    def write_weights(tmp: str) -> None:
        body = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        model.backbone.save_pretrained(tmp, state_dict=body, safe_serialization=True)
        save_file({VALUE_HEAD_KEY: state[VALUE_HEAD_KEY].contiguous()}, os.path.join(tmp, VALUE_HEAD_FILE))

    write_model_directory(output_dir, tokenizer, write_weights, extra_json={**(extra_json or {}), META_FILE: meta},
                          metrics=metrics, metrics_title=metrics_title)
