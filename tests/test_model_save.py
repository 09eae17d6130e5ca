"""Tokenizer conventions, model construction, and HF save/reload with identical logits (LoRA fused)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_pickle_only_model_dir

from training.utils.errors import UserInputError
from training.utils.lora import LoRALinear, convert_linear_layer_to_lora
from training.utils.model.build import create_hf_model
from training.utils.model.save import save_hf_format
from training.utils.tokenizer import load_tokenizer


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.tensor([[5, 17, 99, 300, 7, 0], [8, 9, 10, 11, 12, 13]])


def test_tiny_tokenizer_has_distinct_pad_and_eos(tokenizer):
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("12345", add_special_tokens=False)["input_ids"].__len__() == 5


def test_tokenizer_without_pad_gets_a_real_pad(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(config_path.read_text())
    cfg.pop("pad_token", None)
    config_path.write_text(json.dumps(cfg))
    raw = AutoTokenizer.from_pretrained(tmp_path)
    assert raw.pad_token is None
    fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token_id is not None and fixed.pad_token_id != fixed.eos_token_id


@pytest.mark.parametrize("name", ["tiny/opt", "tiny/llama"])
def test_save_and_reload_gives_identical_logits(tmp_path, tokenizer, ids, name):
    torch.manual_seed(0)
    model = create_hf_model(name, tokenizer).eval()
    save_hf_format(model, tokenizer, str(tmp_path / "out"))
    files = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert torch.equal(logits_of(model, ids), logits_of(reloaded, ids))
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] == tokenizer.pad_token_id
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded_tok.pad_token_id == tokenizer.pad_token_id and reloaded_tok.eos_token_id == tokenizer.eos_token_id


def test_lora_model_saves_fused_without_lora_keys(tmp_path, tokenizer, ids):
    torch.manual_seed(0)
    model = convert_linear_layer_to_lora(create_hf_model("tiny/opt", tokenizer), "layers.", 4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_left_weight.normal_(std=0.05)
    expected = logits_of(model, ids)
    save_hf_format(model, tokenizer, str(tmp_path / "out"))
    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert not any("lora" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert torch.allclose(expected, logits_of(reloaded, ids), atol=1e-5)
    assert any(isinstance(m, LoRALinear) and not m.fuse_lora for m in model.modules())  # live model untouched


def test_dropout_override(tokenizer):
    model = create_hf_model("tiny/opt", tokenizer, dropout=0.0)
    assert model.config.dropout == 0.0 and model.config.attention_dropout == 0.0


def test_save_is_atomic_and_keeps_run_logs(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "out"
    (out / "step1_model").mkdir(parents=True)  # --tensorboard_path pointing into the output dir
    (out / "step1_model" / "events.out.tfevents.1.host").write_bytes(b"tb")
    (out / "checkpoints" / "step_00000003").mkdir(parents=True)
    (out / "training.log").write_text("log line\n")
    model = create_hf_model("tiny/opt", tokenizer)
    save_hf_format(model, tokenizer, str(out))
    assert (out / "training.log").read_text() == "log line\n" and (out / "model.safetensors").exists()
    assert (out / "step1_model" / "events.out.tfevents.1.host").read_bytes() == b"tb"
    assert (out / "checkpoints" / "step_00000003").is_dir()
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        save_hf_format(model, tokenizer, str(out))
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp directory left behind


def test_bad_model_directories(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="has no config.json"):
        create_hf_model(str(tmp_path / "empty"), tokenizer)
    with pytest.raises(UserInputError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    pickle_dir = write_pickle_only_model_dir(create_hf_model("tiny/opt", tokenizer), tmp_path / "pickle")
    with pytest.raises(UserInputError, match="pickle"):
        create_hf_model(str(pickle_dir), tokenizer)
    with pytest.raises(UserInputError, match="unknown tiny model"):
        create_hf_model("tiny/gpt9", tokenizer)


def test_zero3_construction_does_not_leak_into_later_models(distributed, tokenizer):
    """transformers registers the ZeRO-3 config process-wide; a later ZeRO-0 model must stay whole."""
    from training.utils.ds_config import get_train_ds_config

    zero3 = get_train_ds_config(offload=False, dtype="fp32", stage=3, train_batch_size=1, micro_batch_size=1,
                                gradient_accumulation_steps=1)
    partitioned = create_hf_model("tiny/opt", tokenizer, ds_config=zero3)
    # (the tied input embedding may be left for deepspeed.initialize to partition)
    assert sum(hasattr(p, "ds_id") for p in partitioned.parameters()) >= len(list(partitioned.parameters())) - 1
    plain = create_hf_model("tiny/opt", tokenizer)
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    assert sum(p.numel() for p in plain.parameters()) > 1_000_000
