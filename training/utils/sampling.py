"""Decoding controls, and batched generation of replies in a model's prompt format (stops at its stop tokens)."""
import contextlib
from dataclasses import dataclass

import torch

from training.utils import precision
from training.utils.data.collators import PromptCollator
from training.utils.errors import env_switch
from training.utils.model.attention import SEGMENT_ATTENTION
from training.utils.model.kv_cache import block_kv_cache, cache_kwarg
from training.utils.model.lean_decode import lean_forward
from training.utils.model.multinomial import fast_multinomial
from training.utils.model.packed_linear import packed_linears


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
    def from_flags(cls, max_new_tokens: int, flags, do_sample: bool | None = None,
                   num_beams: int = 1) -> "SamplingConfig":
        """From SamplingFlags (training/utils/flags.py); `do_sample` None samples exactly when the temperature
        is above 0 (temperature 0 is greedy), False forces greedy decoding."""
        return cls(max_new_tokens, do_sample=flags.temperature > 0 if do_sample is None else do_sample,
                   temperature=flags.temperature, top_p=flags.top_p, top_k=flags.top_k,
                   repetition_penalty=flags.repetition_penalty, num_beams=num_beams)


@contextlib.contextmanager
def decoding_kernels(model, rows_hint: int = 8):
    """Decode with the kernels that are faster for it, on a bf16/fp16 model on CPU: the attention chosen for the
    CPU (decode_attention), linear layers on packed weights (model.packed_linear; bf16, the same values; the
    decoding steps' on AMX tiles where the CPU has them, model.amx_linear, the same values too), and a KV
    cache grown in blocks (model.kv_cache: transformers' cache copies every layer's keys and values at every token;
    the block cache made decoding ~6% faster with eager attention on an AMD EPYC, ~20% with SDPA on a Xeon with
    AMX): inside the block, `model.generate` gets one unless the call passes its own cache or searches beams; and
    decoding steps over that cache without transformers' per-call machinery (model.lean_decode); sampled tokens are
    drawn with torch.multinomial's own random numbers made faster (model.multinomial: the same tokens).
    Full-sequence passes keep their implementation (SDPA, or segment attention: model.attention). fp32,
    accelerators and RLHF_DECODING_KERNELS=0 are left alone; the model is switched back on exit."""
    current = getattr(model.config, "_attn_implementation", None)
    parameter = next(model.parameters(), None)
    switch = (current in ("sdpa", SEGMENT_ATTENTION) and parameter is not None and parameter.device.type == "cpu"
              and parameter.dtype in (torch.bfloat16, torch.float16) and env_switch("RLHF_DECODING_KERNELS"))
    lean = lean_forward(model) if switch else None
    own_forward = vars(model).get("forward")  # an instance's own forward (already patched) is put back on exit
    if switch:
        model.set_attn_implementation(decode_attention(parameter.dtype))
        model.generate = _with_block_cache(model, model.generate)
        if lean is not None:
            model.forward = lean
    try:
        with packed_linears(model, rows_hint), fast_multinomial() if switch else contextlib.nullcontext():
            yield
    finally:
        if switch:
            del model.generate  # the class's own again
            if lean is not None and own_forward is not None:
                model.forward = own_forward
            elif lean is not None:
                del model.forward  # the class's own again
            model.set_attn_implementation(current)


def decode_attention(dtype: torch.dtype) -> str:
    """The attention a CPU decodes a `dtype` model with, one new token per row against the KV cache: SDPA for
    bf16 on a CPU with AMX-BF16 (its flash kernel runs on oneDNN's brgemm, which uses the AMX tiles: decoding
    1.1-1.3x faster than with eager attention on a Xeon, tiny/opt-20m, 8 rows, 64-256 prompt tokens + 128 new
    ones, the attention alone 2.2-4x), eager attention elsewhere (SDPA's
    one-token queries were ~1.6x slower there on an AMD EPYC with AVX-512 BF16: 4.3 s against 2.7 s)."""
    return "sdpa" if dtype == torch.bfloat16 and precision.cpu_has_amx_bf16() else "eager"


def _with_block_cache(model, generate):
    """`generate` that decodes over a fresh block KV cache (model.kv_cache) where one applies."""
    name = cache_kwarg(model)

    def generate_with_block_cache(*args, **kwargs):
        beams = kwargs.get("num_beams") or model.generation_config.num_beams or 1
        own_cache = any(kwargs.get(key) is not None for key in ("cache", "past_key_values"))
        if not own_cache and kwargs.get("use_cache", True) and beams == 1:
            cache = block_kv_cache(model, _positions_needed(model, args, kwargs))
            if cache is not None:
                kwargs[name] = cache
        return generate(*args, **kwargs)
    return generate_with_block_cache


def _positions_needed(model, args: tuple, kwargs: dict) -> int:
    """The most positions a `generate(*args, **kwargs)` call caches (prompt width + max_new_tokens, or max_length),
    or 0 where the call does not say."""
    prompt = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    config = kwargs.get("generation_config") or model.generation_config
    new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        return 0
    if new_tokens is not None:
        return prompt.size(1) + int(new_tokens)
    return int(kwargs.get("max_length", config.max_length) or 0)


@torch.no_grad()
def generate_replies(model, prompt_format, prompts: list[str], sampling: SamplingConfig,
                     batch_size: int = 16) -> list[str]:
    """The reply text for each prompt (HH text, or messages), in order, rendered in `prompt_format`
    (chat_format.PromptFormat) and stopped at its stop tokens (not part of the text)."""
    tokenizer = prompt_format.tokenizer
    collator = PromptCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    replies = []
    with decoding_kernels(model):
        for start in range(0, len(prompts), batch_size):
            items = [{"prompt_ids": prompt_format.encode_prompt(p)} for p in prompts[start:start + batch_size]]
            batch = collator(items)
            output = model.generate(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device),
                                    eos_token_id=prompt_format.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                                    **sampling.generate_kwargs())
            new_tokens = output[:, batch["input_ids"].size(1):]
            replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return replies
