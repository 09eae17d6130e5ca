"""model.lean_decode: a decoding step taken over from transformers' forward gives its logits and cache bit for bit,
for every architecture it has a step for and both decoding attentions; generate inside sampling.decoding_kernels
gives the tokens it gives without the lean step; every other call runs the model's own forward."""
import pytest
import torch

from tests.test_kv_cache import left_padded_prompts, tiny_model
from training.utils import sampling
from training.utils.model import lean_decode
from training.utils.model.kv_cache import BLOCK_CACHE_MODEL_TYPES, block_kv_cache, cache_kwarg


@pytest.fixture(autouse=True)
def transformers_attention(monkeypatch):
    """The lean step with transformers' own attention functions, which it must match bit for bit (the decoding
    kernel, whose values are the attention's to bf16 rounding, has its own tests: tests/test_decode_attention.py)."""
    monkeypatch.setenv("RLHF_DECODE_ATTENTION_KERNEL", "0")


ARCHITECTURES = ["tiny/opt", "tiny/llama", "tiny/llama3", "tiny/qwen2", "opt-projected"]  # llama3: grouped KV heads


def _model(name: str, tokenizer, attention: str = "sdpa"):
    if name == "opt-projected":  # OPT whose embeddings are narrower than its layers (project_in / project_out)
        from transformers import OPTForCausalLM

        from training.utils.model.configs import load_tiny_config

        torch.manual_seed(0)
        config = load_tiny_config("tiny/opt")
        config.word_embed_proj_dim, config.dropout = 96, 0.0
        model = OPTForCausalLM(config).to(torch.bfloat16).eval()
        assert model.model.decoder.project_in is not None
    else:
        model = tiny_model(name, tokenizer, eager=False)
    model.set_attn_implementation(attention)
    return model


def _fill_cache(model, ids, mask):
    cache = block_kv_cache(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **{cache_kwarg(model): cache}).logits
    return cache, logits[:, -1].argmax(-1, keepdim=True)


def test_every_block_cache_architecture_has_a_lean_step():
    """The block cache is handed to generate only with the lean step, whose calls always carry a 2-D mask."""
    assert BLOCK_CACHE_MODEL_TYPES <= lean_decode.LEAN_MODEL_TYPES


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padded", "padded-positions", "unpadded"])
def test_lean_steps_give_the_logits_and_cache_of_the_model_forward(name, attention, layout, tokenizer):
    """Every step's logits and the cache bit for bit those of the model's forward: left-padded rows (with or without
    the position ids generate passes), and unpadded rows, which generate sends without a mask (the model's forward
    gets the all-ones mask, over which transformers' own path masks the buffers' tail)."""
    model = _model(name, tokenizer, attention)
    lean = lean_decode.lean_forward(model)
    assert lean is not None
    lengths = (30, 30, 30) if layout == "unpadded" else (30, 7, 19)
    ids, mask = left_padded_prompts(tokenizer, lengths)
    # 30 positions + 40 steps: the block buffers grow from 32 to 64 to 96 positions on the way
    caches, tokens = {}, {}
    for kind in ("model", "lean"):
        caches[kind], tokens[kind] = _fill_cache(model, ids, mask)
    step_mask, name_ = mask, cache_kwarg(model)
    with torch.no_grad():
        for step in range(40):
            step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            extra = {}
            if layout == "padded-positions":
                extra["position_ids"] = (step_mask.cumsum(1) - 1).masked_fill(step_mask == 0, 1)[:, -1:]
            expected = model(input_ids=tokens["model"], attention_mask=step_mask, **{name_: caches["model"]},
                             use_cache=True, return_dict=True, **extra).logits
            got = lean(input_ids=tokens["lean"], attention_mask=None if layout == "unpadded" else step_mask,
                       **{name_: caches["lean"]}, use_cache=True, return_dict=True, logits_to_keep=0, **extra).logits
            assert got.shape == expected.shape == (3, 1, model.config.vocab_size)
            assert torch.equal(got, expected), f"step {step}"
            # feed a mix of the argmax and fixed ids, so later steps attend over varied keys
            tokens["model"] = tokens["lean"] = torch.where(torch.tensor([[step % 2 == 0]]), expected[:, -1].argmax(
                -1, keepdim=True), torch.tensor([[17], [230], [4000]]))
    for model_layer, lean_layer in zip(caches["model"].layers, caches["lean"].layers):
        assert model_layer.length == lean_layer.length == 30 + 40
        assert torch.equal(model_layer.keys, lean_layer.keys) and torch.equal(model_layer.values, lean_layer.values)


def test_unpadded_rows_decode_over_the_block_cache_as_over_transformers_cache(tokenizer):
    """Regression: generate drops a mask of all ones, and transformers' SDPA path then gives a one-token query no
    mask, so over the block buffers it attended to their zero-filled tail (logits far off); inside decoding_kernels
    each step is masked: the logits are transformers' own cache's up to bf16 rounding (SDPA sums in another order)."""
    from transformers.cache_utils import DynamicCache

    model = _model("tiny/opt", tokenizer)
    ids, _ = left_padded_prompts(tokenizer, (12, 12))  # the buffers hold 32 positions: 20 unused at the first step
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 10, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        reference = model.generate(ids, **{cache_kwarg(model): DynamicCache()}, **kwargs).logits
        with sampling.decoding_kernels(model):
            model.set_attn_implementation("sdpa")  # whatever the CPU: the path that needs the mask
            decoded = model.generate(ids, **kwargs).logits
    scale = max(step.abs().max().item() for step in reference)
    assert max((a.float() - b.float()).abs().max().item() for a, b in zip(reference, decoded)) <= 0.02 * scale


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_generate_inside_decoding_kernels_gives_the_tokens_without_the_lean_step(name, tokenizer, monkeypatch):
    model = _model(name, tokenizer)
    ids, mask = left_padded_prompts(tokenizer)
    kwargs = {"attention_mask": mask, "max_new_tokens": 37, "do_sample": True, "top_k": 0,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    steps = []
    lean_forward = lean_decode.lean_forward

    def counting_lean_forward(model_):
        forward = lean_forward(model_)

        def counted(*args, **kw):
            steps.append(kw.get("input_ids").shape)
            return forward(*args, **kw)
        return counted

    outputs = {}
    for kind in ("without", "with"):
        monkeypatch.setattr(sampling, "lean_forward", counting_lean_forward if kind == "with" else lambda m: None)
        torch.manual_seed(7)
        with torch.no_grad(), sampling.decoding_kernels(model):
            outputs[kind] = model.generate(ids, **kwargs)
        assert "forward" not in vars(model)  # the class's forward again
    assert torch.equal(outputs["with"], outputs["without"])
    assert steps[0] == (3, 30) and len(steps) > 1 and all(shape == (3, 1) for shape in steps[1:])


def test_other_calls_run_the_model_forward_and_an_own_forward_is_put_back(tokenizer):
    model = tiny_model("tiny/opt", tokenizer, eager=False)
    ids, mask = left_padded_prompts(tokenizer)
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    calls = []

    def own_forward(*args, **kwargs):
        calls.append(sorted(kwargs))
        return type(model).forward(model, *args, **kwargs)

    model.forward = own_forward
    lean = lean_decode.lean_forward(model)
    name = cache_kwarg(model)

    def decoding_step(**extra):
        """One step over a freshly filled cache; whether the model's own forward ran it."""
        cache, token = _fill_cache(model, ids, mask)
        before = len(calls)
        lean(input_ids=token, attention_mask=step_mask, **{name: cache}, **extra)
        return len(calls) > before

    with torch.no_grad():
        assert not decoding_step()
        assert not decoding_step(logits_to_keep=1, position_ids=torch.tensor([[30], [7], [19]]))  # as generate sends
        assert decoding_step(output_hidden_states=True)  # other kwargs, or other kinds of values
        assert decoding_step(logits_to_keep=torch.tensor([0])) and decoding_step(position_ids=torch.ones(3, 2).long())
        assert decoding_step(use_cache=False)
        model.train()  # dropout would apply
        assert decoding_step()
        model.eval()
        before = len(calls)
        lean(input_ids=ids, attention_mask=mask)  # a full-sequence pass
        assert len(calls) == before + 1
    with torch.enable_grad():
        assert decoding_step()
    with sampling.decoding_kernels(model):
        assert model.forward is not own_forward
    assert model.forward is own_forward


def test_architectures_without_a_lean_step_and_zero3_models_keep_their_forward(tokenizer):
    model = tiny_model("tiny/opt", tokenizer, eager=False)
    parameter = next(model.parameters())
    parameter.ds_id = 0  # what ZeRO-3 marks a partitioned parameter with (its hooks gather them module by module)
    assert lean_decode.lean_forward(model) is None
    del parameter.ds_id
    model.config.model_type = "gpt2"  # any architecture lean_decode has no step for
    assert lean_decode.lean_forward(model) is None
    with sampling.decoding_kernels(model):
        assert "forward" not in vars(model)
