"""Weight decay by tensor shape: which parameters decay, across architectures, with LoRA and under ZeRO-3."""
import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from training.utils.lora import LORA_PARAM_NAMES, convert_linear_layer_to_lora
from training.utils.model.configs import load_tiny_config
from training.utils.optim import get_optimizer_grouped_parameters

VOCAB, HIDDEN, LAYERS, FFN = 128, 32, 2, 64
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
DECODER = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **SPECIAL}

BUILDERS = {
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                            num_attention_heads=2, ffn_dim=FFN, max_position_embeddings=64,
                                            word_embed_proj_dim=HIDDEN, **SPECIAL)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2,
                                               n_positions=64, **SPECIAL)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),  # q/k/v projections have biases
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**DECODER, head_dim=8)),
    "tiny/opt": lambda: AutoModelForCausalLM.from_config(load_tiny_config("tiny/opt")),
    "tiny/llama": lambda: AutoModelForCausalLM.from_config(load_tiny_config("tiny/llama")),
}
# Module names whose nn.Linear layers LoRA converts. GPT-2's blocks use transformers' Conv1D, which
# convert_linear_layer_to_lora (nn.Linear only) does not touch, so GPT-2 has no LoRA case.
LORA_PARTS = {"opt": "decoder.layers.", "llama": "layers.", "qwen2": "layers.", "mistral": "layers.",
              "gemma": "layers.", "tiny/opt": "decoder.layers.", "tiny/llama": "layers."}
# Name fragments of the norm layers of these architectures (GPT-2's ln_1/ln_2 were missed by the old name list).
NORM_FRAGMENTS = ("norm", "ln_")


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]()


def split(model: nn.Module, groups: list[dict]) -> dict[str, list[str]]:
    """Parameter names per group ("decay" | "lora" | "no_decay"), asserting nothing is lost or duplicated."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups (or twice in one)"
    assert set(grouped) == trainable, "groups must hold exactly the trainable parameters"
    out = {"decay": [], "lora": [], "no_decay": []}
    for group in groups:
        if group["weight_decay"] == 0.0:
            kind = "no_decay"
        elif any(any(ln in names[id(p)] for ln in LORA_PARAM_NAMES) for p in group["params"]):
            kind = "lora"
        else:
            kind = "decay"
        assert not out[kind], f"two {kind} groups"
        out[kind] = [names[id(p)] for p in group["params"]]
    return out


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_vectors_do_not_decay_matrices_and_embeddings_do(arch):
    model = build(arch)
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all("lr" not in g for g in groups)
    by_kind = split(model, groups)
    params = dict(model.named_parameters())
    assert not by_kind["lora"]
    assert by_kind["no_decay"] and all(params[n].dim() == 1 for n in by_kind["no_decay"])
    assert by_kind["decay"] and all(params[n].dim() == 2 for n in by_kind["decay"])

    norms = [n for n in params if any(f in n.rsplit(".", 2)[-2] for f in NORM_FRAGMENTS)]
    biases = [n for n in params if n.endswith(".bias")]
    assert norms, "every architecture here has norm layers"
    assert set(norms) | set(biases) <= set(by_kind["no_decay"])
    # Embedding tables are matrices and decay, as in nanoGPT and torchtune; a tied head is listed once.
    embeddings = [f"{mod_name}.weight" for mod_name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert embeddings and set(embeddings) <= set(by_kind["decay"])


def test_gpt2_block_norms_are_not_decayed():
    """The regression: GPT-2's per-block ln_1/ln_2 (not only the final ln_f) are in the no-decay group."""
    model = build("gpt2")
    no_decay = split(model, get_optimizer_grouped_parameters(model, weight_decay=0.1))["no_decay"]
    for layer in range(LAYERS):
        for norm in ("ln_1", "ln_2"):
            assert {f"transformer.h.{layer}.{norm}.weight", f"transformer.h.{layer}.{norm}.bias"} <= set(no_decay)


@pytest.mark.parametrize("arch", list(LORA_PARTS))
def test_lora_factors_get_their_own_group(arch):
    model = convert_linear_layer_to_lora(build(arch), LORA_PARTS[arch], lora_dim=4)
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1, lora_learning_rate=5e-4)
    assert len(groups) == 3
    decay, lora, no_decay = groups
    assert lora["lr"] == 5e-4 and lora["weight_decay"] == 0.1 and "lr" not in decay and "lr" not in no_decay
    by_kind = split(model, groups)
    params = dict(model.named_parameters())
    expected_lora = [n for n in params if n.rsplit(".", 1)[-1] in LORA_PARAM_NAMES]
    assert expected_lora and sorted(by_kind["lora"]) == sorted(expected_lora)
    # The converted base weights and biases are frozen and left out; what is left splits by shape.
    assert all(params[n].dim() >= 2 for n in by_kind["decay"])
    assert all(params[n].dim() < 2 for n in by_kind["no_decay"])


def test_lora_group_without_own_learning_rate():
    model = convert_linear_layer_to_lora(build("llama"), "layers.", lora_dim=4)
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.0)
    assert all("lr" not in g for g in groups) and len(groups) == 3


def test_frozen_parameters_and_empty_groups_are_dropped():
    model = build("llama")
    for name, param in model.named_parameters():
        param.requires_grad = "norm" in name
    groups = get_optimizer_grouped_parameters(model, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == 2 * LAYERS + 1


def test_adamw_step_decays_a_matrix_but_not_a_norm_gain():
    """With zero gradients AdamW's update is only the decoupled decay: w -= lr * wd * w."""
    model = build("gpt2")
    lr, wd = 1e-2, 0.1
    optimizer = torch.optim.AdamW(get_optimizer_grouped_parameters(model, weight_decay=wd), lr=lr)
    gain = model.transformer.h[0].ln_1.weight
    matrix = model.transformer.h[0].mlp.c_fc.weight
    gain_before, matrix_before = gain.detach().clone(), matrix.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(gain.detach(), gain_before, atol=0, rtol=0)
    torch.testing.assert_close(matrix.detach(), matrix_before * (1 - lr * wd))
    assert matrix.detach().norm() < matrix_before.norm()


def test_cpu_adamw_is_the_fused_kernel_with_the_per_tensor_loops_update():
    """create_optimizer on CPU: torch's fused AdamW, whose steps match the default per-tensor AdamW (decay and
    no-decay groups, three steps of the same gradients) to float rounding."""
    from training.utils.optim import create_optimizer

    model, reference = build("opt"), build("opt")  # the same seeded weights
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = create_optimizer(get_optimizer_grouped_parameters(model, weight_decay=0.1), lr=1e-2, offload=False,
                                 device="cpu")
    baseline = torch.optim.AdamW(get_optimizer_grouped_parameters(reference, weight_decay=0.1), lr=1e-2,
                                 betas=(0.9, 0.95), foreach=False)
    assert isinstance(optimizer, torch.optim.AdamW) and all(g["fused"] for g in optimizer.param_groups)
    torch.manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        baseline.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert not torch.equal(p.detach(), before[name]), name
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_zero3_partitioned_parameters_group_by_their_full_shape(distributed):
    """Under ZeRO-3 the local shards are empty 1-D tensors; the decision must use ds_shape."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from training.utils.ds_config import get_train_ds_config

    config = get_train_ds_config(offload=False, dtype="fp32", stage=3, train_batch_size=2, micro_batch_size=2,
                                 gradient_accumulation_steps=1, device="cpu")
    plain = build("llama")
    registration = HfDeepSpeedConfig(config)  # noqa: F841  (zero.Init applies while this object is alive)
    try:
        model = LlamaForCausalLM._from_config(plain.config)
    finally:
        unset_hf_deepspeed_config()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert hasattr(q_proj, "ds_id") and q_proj.dim() < 2  # the situation the full shape is for
    expected = split(plain, get_optimizer_grouped_parameters(plain, weight_decay=0.1))
    assert split(model, get_optimizer_grouped_parameters(model, weight_decay=0.1)) == expected
