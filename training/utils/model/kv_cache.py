"""A KV cache for decoding on CPU that grows in blocks of BLOCK positions instead of one token per step.

transformers' DynamicCache appends each new token with torch.cat, copying every layer's whole keys and values
at every step (~15% of a bf16 decoding step on CPU, tiny/opt-20m, 8 rows, 128 new tokens). A block KV cache keeps
each layer's keys and values in a zeroed buffer [B, H, capacity, D]: a new token is written in place, and the
buffer is copied only when it fills. A cache made with `reserve` (generate's prompt width + max_new_tokens, as
sampling.decoding_kernels makes it) allocates that many positions at once and never grows: each growth zeroed a
new buffer and copied the old one into it (~4% of decoding a batch of 8 x (256 + 128) tokens). The attention
reads the buffer's first positions up to the next multiple of BLOCK (a view: new widths, hence new kernel
shapes, only every BLOCK tokens): the cache reports that width as the mask length (get_mask_sizes), so
transformers' mask builder masks the unused tail (zeros) like padding, and each softmax gives it weight exactly 0.
That needs a mask: when nothing is padded, generate drops the 2-D mask and transformers' SDPA path gives a one-token
query none, so every call over this cache must carry one (model.lean_decode's forward, which decoding_kernels
installs beside it, does).

Used by sampling.decoding_kernels for the architectures in BLOCK_CACHE_MODEL_TYPES (their attention takes the
mask from transformers' builders; tests/test_kv_cache.py checks each gives the same tokens as DynamicCache).
"""
import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from training.utils.model import round_up

BLOCK = 32
# A reservation is capped at this many bytes per buffer (past it, the buffer grows a block at a time): a call asking
# for far more new tokens than it will make (a huge max_new_tokens, stopped early at EOS) must not allocate them all.
RESERVE_BYTES = 64 * 2**20
BLOCK_CACHE_MODEL_TYPES = frozenset({"opt", "llama", "qwen2"})


def block_ceil(length: int) -> int:
    return round_up(length, BLOCK)


class BlockKVLayer(DynamicLayer):
    """One layer's keys and values: [B, H, capacity, D] buffers whose first `length` positions are cached.
    `reserve`: the positions the first buffer holds at least (0: grow a block at a time)."""

    def __init__(self, reserve: int = 0):
        super().__init__()
        self.reserve = block_ceil(reserve)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.size(-2)
        if self.keys.dim() != 4 or end > self.keys.size(-2):
            self.keys, self.values = (self._grown(old, new, end) for old, new in ((self.keys, key_states),
                                                                                  (self.values, value_states)))
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        width = block_ceil(end)
        return self.keys[:, :, :width], self.values[:, :, :width]

    def _grown(self, old: torch.Tensor, new: torch.Tensor, end: int) -> torch.Tensor:
        """A zeroed buffer of capacity block_ceil(end) (at least `reserve`, up to RESERVE_BYTES) holding the cached
        positions of `old`."""
        position_bytes = new.shape[0] * new.shape[1] * new.shape[-1] * new.element_size()
        reserve = min(self.reserve, RESERVE_BYTES // position_bytes // BLOCK * BLOCK)
        buffer = new.new_zeros(*new.shape[:2], max(block_ceil(end), reserve), new.size(-1))
        if self.length:
            buffer[:, :, :self.length] = old[:, :, :self.length]
        return buffer

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return block_ceil(self.get_seq_length() + query_length), 0

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            start = max(self.length + tokens_to_remove, 0)
            self.keys[:, :, start:self.length] = 0
            self.values[:, :, start:self.length] = 0
            self.length = start


def block_kv_cache(model, reserve: int = 0) -> Cache | None:
    """A block KV cache (a Cache of BlockKVLayer, each allocating `reserve` positions at once) for `model`'s decoder
    layers, or None where it does not apply (another architecture, or any sliding-window / non-full-attention
    layer)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if config.model_type not in BLOCK_CACHE_MODEL_TYPES or any(t != "full_attention" for t in layer_types):
        return None
    return Cache(layers=[BlockKVLayer(reserve) for _ in range(config.num_hidden_layers)])


def cache_kwarg(model) -> str:
    """The name generate and forward take a KV cache under: `cache` from transformers 5.x releases that renamed
    it, `past_key_values` before (still accepted, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
