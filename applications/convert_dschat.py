"""Convert a model DeepSpeed-Chat saved (an actor, or a reward model / critic) into this project's formats.

    python applications/convert_dschat.py --input ds_out/actor --output converted/actor --tokenizer facebook/opt-1.3b
    python applications/convert_dschat.py --input ds_out/reward --output converted/reward --tokenizer facebook/opt-350m

DeepSpeed-Chat's `save_hf_format` writes `config.json`, `pytorch_model.bin` (a `torch.save`d state dict) and the
tokenizer's vocabulary files. This project loads weights from safetensors only, so those directories are refused
everywhere else; here the state dict is read with `torch.load(weights_only=True)`, which unpickles tensors and
plain containers only and never runs code: a file holding anything else is refused. A reward model is told by
its keys (`v_head.weight` and the body under `rwtranrsformer.`, DeepSpeed-Chat's spelling); any other state
dict is a causal LM. The output is what steps 1-3 save (safetensors, the tokenizer, `reward_model.json` for a
reward model, `prompt_format.json`: DeepSpeed-Chat trains on HH text), written atomically, so `chat.py`,
`rw_eval.py`, `prompt_eval.py` and step 3 use it as any model of this project. The conversion is exact: the
converted model gives the logits (scores) the original weights give.

The vocabulary files alone may not rebuild the tokenizer DeepSpeed-Chat used (it loaded the base model's):
`--tokenizer` names that base model (default: the input directory).
"""
import os
from dataclasses import dataclass

import torch

from training.utils.config import option, parse_config
from training.utils.data.chat_format import HH, PROMPT_FORMAT_FILE
from training.utils.errors import UserInputError, report_user_errors
from training.utils.model.build import fit_to_tokenizer

WEIGHTS_FILE = "pytorch_model.bin"
REWARD_BODY_PREFIX = "rwtranrsformer."  # DeepSpeed-Chat's RewardModel attribute name, spelling included
VALUE_HEAD_KEY = "v_head.weight"


@dataclass
class ConvertConfig:
    input: str = option(help="A directory DeepSpeed-Chat saved: config.json + pytorch_model.bin (+ vocabulary).",
                        required=True)
    output: str = option(help="Where the converted model is written (replaced atomically).", required=True)
    tokenizer: str | None = option(None, "The tokenizer to save with it: the base model DeepSpeed-Chat trained from "
                                         "(a local directory or hub id); default: --input.")

    def validate(self) -> None:
        if os.path.realpath(self.input) == os.path.realpath(self.output):
            raise UserInputError(f"--output '{self.output}' is --input: write the converted model elsewhere")


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of `directory/pytorch_model.bin`, loaded without running any pickled code."""
    import pickle
    import struct

    path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise UserInputError(f"--input '{directory}' has no {WEIGHTS_FILE}: pass a directory DeepSpeed-Chat's "
                             "save_hf_format wrote")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, struct.error) as err:  # struct: cut short
        raise UserInputError(f"'{path}' holds more than tensors or is damaged ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160]}): only a state dict of tensors is converted; pickled "
                             "code is never loaded") from None
    others = [key for key, value in (state.items() if isinstance(state, dict) else [])
              if not isinstance(value, torch.Tensor)]
    if not isinstance(state, dict) or others or not state:
        what = f"non-tensor entries ({', '.join(map(str, others[:3]))})" if others else "no state dict of tensors"
        raise UserInputError(f"'{path}' holds {what}: only a state dict of tensors is converted")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load `state` into `model` exactly: every key used, every parameter given (tied output embeddings may be
    absent: they are the input embeddings)."""
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in result.missing_keys if key not in tied and not key.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        raise UserInputError(f"'{path}' does not fit its config.json: missing {missing[:3]}, unexpected "
                             f"{result.unexpected_keys[:3]}: convert the directory DeepSpeed-Chat saved, unchanged")


@report_user_errors
def main(argv=None) -> str:
    config = parse_config(ConvertConfig, argv, __doc__.split("\n")[0])
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from training.utils.model.reward_model import RewardModel, save_reward_model
    from training.utils.model.save import save_hf_format
    from training.utils.tokenizer import load_tokenizer

    state = read_state_dict(config.input)
    try:
        model_config = AutoConfig.from_pretrained(config.input, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise UserInputError(f"--input '{config.input}': cannot read config.json ({reason})") from None
    tokenizer = load_tokenizer(config.tokenizer or config.input)
    path = os.path.join(config.input, WEIGHTS_FILE)
    saved_format = {PROMPT_FORMAT_FILE: {"prompt_format": HH}}
    if VALUE_HEAD_KEY in state:
        body = {key.removeprefix(REWARD_BODY_PREFIX): value for key, value in state.items() if key != VALUE_HEAD_KEY}
        model = RewardModel(AutoModel.from_config(model_config, dtype=torch.float32))
        load_weights(model.backbone, body, path)
        if tuple(state[VALUE_HEAD_KEY].shape) != tuple(model.v_head.weight.shape):
            raise UserInputError(f"'{path}': {VALUE_HEAD_KEY} has shape {tuple(state[VALUE_HEAD_KEY].shape)}, the "
                                 f"backbone needs {tuple(model.v_head.weight.shape)}")
        with torch.no_grad():
            model.v_head.weight.copy_(state[VALUE_HEAD_KEY])
        fit_to_tokenizer(model.backbone, tokenizer)
        save_reward_model(model, tokenizer, config.output, reward_stats={}, extra_json=saved_format)
        kind = "reward model"
    else:
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        load_weights(model, state, path)
        model.tie_weights()
        fit_to_tokenizer(model, tokenizer)
        save_hf_format(model, tokenizer, config.output, extra_json=saved_format)
        kind = "actor (causal LM)"
    print(f"converted the DeepSpeed-Chat {kind} '{config.input}' to '{config.output}' "
          f"({sum(p.numel() for p in model.parameters()):,} parameters, safetensors)")
    return kind


if __name__ == "__main__":
    main()
