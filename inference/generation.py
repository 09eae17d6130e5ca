"""Offline loading and batched generation with the project's prompt format and EOS convention."""
import os
from dataclasses import dataclass

import torch

from training.utils.data.collators import PromptCollator
from training.utils.data.conversation import encode_chunks, prompt_chunks
from training.utils.errors import UserInputError


@dataclass
class SamplingConfig:
    """Decoding controls; defaults are greedy. Generation always stops at the tokenizer's EOS."""
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    num_beams: int = 1

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "repetition_penalty": self.repetition_penalty, "num_beams": self.num_beams}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

    @classmethod
    def from_temperature(cls, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                         repetition_penalty: float = 1.0, greedy: bool = False) -> "SamplingConfig":
        """Chat-style controls: sample when `temperature > 0` and not `greedy`; temperature 0 is greedy."""
        return cls(max_new_tokens, do_sample=temperature > 0 and not greedy, temperature=temperature,
                   top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)


def add_sampling_args(parser) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=1)


def sampling_from_args(args) -> SamplingConfig:
    return SamplingConfig(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.top_k,
                          args.repetition_penalty, args.num_beams)


def load_causal_lm(path: str, device: torch.device):
    """A saved actor (or any HF causal LM directory) and its tokenizer, with no network access."""
    from transformers import AutoModelForCausalLM

    from training.utils.model.configs import TINY_PREFIX
    from training.utils.model.reward_model import is_reward_model_dir
    from training.utils.tokenizer import load_tokenizer

    if path.startswith(TINY_PREFIX):  # a random-initialised tiny model: the "before training" baseline
        from training.utils.model.build import create_hf_model

        tokenizer = load_tokenizer(path)
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
    tokenizer = load_tokenizer(path)
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


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[str], sampling: SamplingConfig,
                     batch_size: int = 16) -> list[str]:
    """The reply text for each HH-format prompt (without the EOS), in order."""
    collator = PromptCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    replies = []
    for start in range(0, len(prompts), batch_size):
        items = [{"prompt_ids": encode_chunks(tokenizer, prompt_chunks(p))[0]}
                 for p in prompts[start:start + batch_size]]
        batch = collator(items)
        output = model.generate(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device),
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **sampling.generate_kwargs())
        new_tokens = output[:, batch["input_ids"].size(1):]
        replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return replies
