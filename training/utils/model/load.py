"""Load a saved causal LM (an actor, or any Hugging Face directory) for generation, offline and safetensors only."""
import os

import torch

from training.utils.errors import UserInputError
from training.utils.tokenizer import DEFAULT_EOS


def load_causal_lm(path: str, device: torch.device, add_eot_token: bool = False, eot_token: str = DEFAULT_EOS):
    """A saved actor (or any HF causal LM directory) and its tokenizer, with no network access
    (`add_eot_token`: tokenizer.load_tokenizer's, for a model trained with --add_eot_token)."""
    from transformers import AutoModelForCausalLM

    from training.utils.model.build import check_model_files
    from training.utils.model.configs import TINY_PREFIX
    from training.utils.model.reward_model import is_reward_model_dir
    from training.utils.tokenizer import load_tokenizer

    if path.startswith(TINY_PREFIX):  # a random-initialised tiny model: the "before training" baseline
        from training.utils.model.build import create_hf_model

        tokenizer = load_tokenizer(path, add_eot_token, eot_token)
        return create_hf_model(path, tokenizer).to(device).eval(), tokenizer
    if not os.path.exists(path):
        raise UserInputError(f"model path '{path}' does not exist: pass the --output_dir of a training step, "
                             "another Hugging Face model directory, or tiny/opt | tiny/llama")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserInputError(f"'{path}' is not a model directory (no config.json): pass the --output_dir "
                             "of a training step or another Hugging Face model directory")
    if is_reward_model_dir(path):
        raise UserInputError(f"'{path}' is a reward model (step 2 output), not a language model: pass an actor "
                             "saved by step 1, DPO or step 3")
    check_model_files(path)
    tokenizer = load_tokenizer(path, add_eot_token, eot_token)
    try:  # safetensors only: pickle checkpoints are refused, never unpickled
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise UserInputError(f"cannot load a causal LM from '{path}': {str(err).splitlines()[0]} (safetensors "
                             "weights are needed; pickle *.bin files are never loaded: re-save them with "
                             "model.save_pretrained(dir))") from err
    return model.to(device).eval(), tokenizer


def default_device() -> torch.device:
    """cuda when a GPU is present, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
