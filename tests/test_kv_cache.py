"""model.kv_cache: decoding with a KV cache grown in blocks gives the tokens and logits of transformers' DynamicCache
for every architecture it is used for, and sampling.decoding_kernels hands it to generate (bf16/fp16 on CPU only)."""
import pytest
import torch
from transformers.cache_utils import DynamicCache

from training.utils.model.kv_cache import BLOCK, BLOCK_CACHE_MODEL_TYPES, BlockKVLayer, block_kv_cache, cache_kwarg


def tiny_model(name: str, tokenizer, dtype=torch.bfloat16, eager: bool = True):
    from training.utils.model.build import create_hf_model

    torch.manual_seed(0)
    model = create_hf_model(name, tokenizer, dropout=0.0).to(dtype).eval()
    if eager:
        model.set_attn_implementation("eager")  # what decoding_kernels decodes with
    return model


def left_padded_prompts(tokenizer, lengths=(30, 7, 19)):
    generator = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.full((len(lengths), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(10, 4000, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama", "tiny/qwen2"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_block_cache_decodes_the_tokens_and_logits_of_the_dynamic_cache(name, do_sample, tokenizer):
    model = tiny_model(name, tokenizer)
    assert model.config.model_type in BLOCK_CACHE_MODEL_TYPES
    ids, mask = left_padded_prompts(tokenizer)
    # 30 prompt positions + 45 new tokens: the buffers grow past 32 and 64 while decoding
    kwargs = {"attention_mask": mask, "max_new_tokens": 45, "min_new_tokens": 45, "do_sample": do_sample,
              "top_k": 0, "pad_token_id": tokenizer.pad_token_id, "output_logits": True,
              "return_dict_in_generate": True}
    outputs = {}
    for kind, cache in (("dynamic", DynamicCache()), ("block", block_kv_cache(model))):
        torch.manual_seed(5)
        with torch.no_grad():
            outputs[kind] = model.generate(ids, **{cache_kwarg(model): cache}, **kwargs)
    dynamic, block = outputs["dynamic"], outputs["block"]
    assert torch.equal(dynamic.sequences, block.sequences)
    assert max((a.float() - b.float()).abs().max().item() for a, b in zip(dynamic.logits, block.logits)) == 0.0
    layer = block.past_key_values.layers[0]
    assert layer.get_seq_length() == 30 + 45 - 1 and layer.keys.size(2) == 3 * BLOCK  # the last token is not cached


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama", "tiny/qwen2"])
def test_sdpa_over_a_block_cache_gives_the_unused_tail_no_weight(name, tokenizer):
    """Decoding with SDPA (decode_attention on a CPU with AMX): the buffer's unused tail is masked, so filling it with
    large keys and values changes no bit of the next token's logits; and those logits are the dynamic cache's up to
    bf16 rounding (SDPA's kernel sums over the longer buffer in another order, so not bit for bit)."""
    model = tiny_model(name, tokenizer, eager=False)
    model.set_attn_implementation("sdpa")
    ids, mask = left_padded_prompts(tokenizer)  # 30 positions: the buffers hold 32
    step_ids, step_mask = torch.tensor([[11], [12], [13]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    logits = {}
    for kind in ("dynamic", "block", "poisoned"):
        cache = DynamicCache() if kind == "dynamic" else block_kv_cache(model)
        with torch.no_grad():
            model(ids, attention_mask=mask, **{cache_kwarg(model): cache})
            if kind == "poisoned":
                for layer in cache.layers:
                    assert layer.keys.size(2) == BLOCK and layer.get_seq_length() == 30
                    layer.keys[:, :, 30:] = 300.0
                    layer.values[:, :, 30:] = -500.0
            logits[kind] = model(step_ids, attention_mask=step_mask, **{cache_kwarg(model): cache}).logits.float()
    assert torch.equal(logits["block"], logits["poisoned"])
    scale = logits["dynamic"].abs().max().item()
    assert (logits["block"] - logits["dynamic"]).abs().max().item() <= 0.02 * scale


def test_block_layer_grows_in_blocks_keeps_the_tail_zero_and_crops():
    layer = BlockKVLayer()
    steps = [torch.randn(2, 3, 5, 4)] + [torch.randn(2, 3, 1, 4) for _ in range(30)]
    for step in steps:
        assert layer.get_mask_sizes(step.size(2)) == (-(-(layer.get_seq_length() + step.size(2)) // BLOCK) * BLOCK, 0)
        keys, values = layer.update(step, -step)
    cached = torch.cat(steps, dim=2)
    assert layer.get_seq_length() == 35 and keys.shape == (2, 3, 2 * BLOCK, 4)
    assert torch.equal(keys[:, :, :35], cached) and torch.equal(values[:, :, :35], -cached)
    assert not keys[:, :, 35:].any() and not values[:, :, 35:].any()
    layer.crop(-3)
    assert layer.get_seq_length() == 32 and not layer.keys[:, :, 32:].any()
    assert torch.equal(layer.keys[:, :, :32], cached[:, :, :32])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)


def test_other_architectures_and_sliding_windows_keep_the_dynamic_cache(tokenizer):
    from types import SimpleNamespace

    def model_with(**config):
        settings = {"model_type": "llama", "num_hidden_layers": 2} | config
        text_config = SimpleNamespace(**settings)
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text_config))

    assert len(block_kv_cache(model_with()).layers) == 2
    assert block_kv_cache(model_with(model_type="gpt2")) is None
    assert block_kv_cache(model_with(layer_types=["full_attention", "sliding_attention"])) is None


def test_decoding_kernels_give_generate_a_block_cache_in_bf16_only(tokenizer, monkeypatch):
    from training.utils.sampling import decoding_kernels

    updates = []
    real_update = BlockKVLayer.update
    monkeypatch.setattr(BlockKVLayer, "update", lambda self, *a, **k: updates.append(1) or real_update(self, *a, **k))
    ids, mask = left_padded_prompts(tokenizer)
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    for dtype, used in ((torch.bfloat16, True), (torch.float32, False)):
        model = tiny_model("tiny/opt", tokenizer, dtype, eager=False)
        updates.clear()
        with torch.no_grad(), decoding_kernels(model):
            model.generate(ids, **kwargs)
            assert bool(updates) == used, dtype
            updates.clear()
            model.generate(ids, **{cache_kwarg(model): DynamicCache()}, **kwargs)  # the caller's own cache is kept
            assert not updates
        assert "generate" not in vars(model)  # the class's generate again
        model.generate(ids, **kwargs)
        assert not updates


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama"])
def test_a_reserved_cache_allocates_once_and_decodes_the_grown_caches_tokens_and_logits(name, tokenizer, monkeypatch):
    model = tiny_model(name, tokenizer, eager=False)
    model.set_attn_implementation("sdpa")
    ids, mask = left_padded_prompts(tokenizer)  # 30 positions + 45 new ones: a grown cache copies at 32 and 64
    kwargs = {"attention_mask": mask, "max_new_tokens": 45, "min_new_tokens": 45, "do_sample": True, "top_k": 0,
              "pad_token_id": tokenizer.pad_token_id, "output_logits": True, "return_dict_in_generate": True}
    grown = []
    real_grown = BlockKVLayer._grown
    monkeypatch.setattr(BlockKVLayer, "_grown", lambda self, *a: grown.append(1) or real_grown(self, *a))
    outputs, allocations = {}, {}
    for reserve in (0, 30 + 45):
        grown.clear()
        torch.manual_seed(5)
        with torch.no_grad():
            outputs[reserve] = model.generate(ids, **{cache_kwarg(model): block_kv_cache(model, reserve)}, **kwargs)
        allocations[reserve] = len(grown) // (2 * model.config.num_hidden_layers)
    assert allocations == {0: 3, 75: 1}  # 32, 64, 96 positions; or 96 at once
    assert torch.equal(outputs[0].sequences, outputs[75].sequences)
    assert all(torch.equal(a, b) for a, b in zip(outputs[0].logits, outputs[75].logits))
    layer = outputs[75].past_key_values.layers[0]
    assert layer.keys.size(2) == 3 * BLOCK and not layer.keys[:, :, layer.get_seq_length():].any()


def test_a_reservation_is_capped_and_the_buffer_still_grows_past_it(monkeypatch):
    from training.utils.model import kv_cache

    monkeypatch.setattr(kv_cache, "RESERVE_BYTES", 2 * BLOCK * 2 * 3 * 4 * 4)  # two blocks of [2, 3, ., 4] fp32
    layer = BlockKVLayer(reserve=10_000)
    keys, _ = layer.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    assert layer.keys.size(2) == 2 * BLOCK and keys.shape == (2, 3, BLOCK, 4)  # a view up to the next block
    steps = [torch.randn(2, 3, 1, 4) for _ in range(2 * BLOCK)]
    for step in steps:
        keys, values = layer.update(step, -step)
    assert layer.get_seq_length() == 5 + 2 * BLOCK and layer.keys.size(2) == 3 * BLOCK
    assert torch.equal(keys[:, :, 5:5 + 2 * BLOCK], torch.cat(steps, dim=2))


def test_decoding_kernels_reserve_the_positions_generate_asks_for(tokenizer, monkeypatch):
    from training.utils import sampling

    reserves = []
    real_cache = sampling.block_kv_cache
    monkeypatch.setattr(sampling, "block_kv_cache", lambda model, reserve=0: reserves.append(reserve)
                        or real_cache(model, reserve))
    model = tiny_model("tiny/opt", tokenizer, eager=False)
    ids, mask = left_padded_prompts(tokenizer)
    common = {"attention_mask": mask, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad(), sampling.decoding_kernels(model):
        model.generate(ids, max_new_tokens=7, **common)
        model.generate(input_ids=ids, max_new_tokens=5, **common)
        model.generate(ids, max_length=40, **common)
        model.generation_config.max_new_tokens = 3
        model.generate(ids, **common)
    assert reserves == [30 + 7, 30 + 5, 40, 30 + 3]
