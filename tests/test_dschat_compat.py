"""DeepSpeed-Chat habits that work unchanged: the evaluation tools' flags and defaults (issue 19)."""
import json

import pytest
import torch

from training.step1_supervised_finetuning import prompt_eval
from training.step2_reward_model_finetuning import rw_eval
from training.utils.data.chat_format import PromptFormat
from training.utils.errors import UserInputError
from training.utils.model.reward_model import create_reward_model, load_reward_model


def test_rw_eval_with_only_the_model_scores_its_example_pairs(reward_dir, capsys):
    summary = rw_eval.main(["--model_name_or_path", str(reward_dir)])
    assert summary["rows"] == len(rw_eval.EXAMPLE_PAIRS) == 2
    model, tokenizer, _ = load_reward_model(str(reward_dir))
    hh = PromptFormat(tokenizer)
    prompts = [hh.prompt(rw_eval.as_prompt(p)) for p, _, _ in rw_eval.EXAMPLE_PAIRS]
    chosen = rw_eval.score(model.eval(), hh, prompts, [c for _, c, _ in rw_eval.EXAMPLE_PAIRS], 512, 8)
    rejected = rw_eval.score(model, hh, prompts, [r for _, _, r in rw_eval.EXAMPLE_PAIRS], 512, 8)
    assert summary["accuracy"] == sum(c > r for c, r in zip(chosen, rejected)) / 2
    assert summary["mean_score"] == pytest.approx(sum(chosen) / 2, abs=1e-5)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 2


def test_the_evaluation_tools_take_deepspeed_chats_tokenizer_flags(reward_dir):
    config = rw_eval.parse_args(["--model_name_or_path", str(reward_dir), "--add_eot_token"])
    assert config.add_eot_token and config.eot_token == "<|endoftext|>"
    config = prompt_eval.parse_args(["--model_name_or_path_baseline", "tiny/opt", "--model_name_or_path_finetune",
                                     "tiny/opt", "--add_eot_token", "--eot_token", "<|endoftext|>"])
    assert config.add_eot_token


@pytest.mark.parametrize("flags, flag", [(["--num_beam_groups", "2"], "--num_beam_groups"),
                                         (["--penalty_alpha", "0.6"], "--penalty_alpha")])
def test_decoding_methods_transformers_5_moved_to_remote_code_are_refused_clearly(flags, flag):
    with pytest.raises(UserInputError, match=f"{flag}: transformers 5 moved this decoding method"):
        prompt_eval.parse_args(["--model_name_or_path_baseline", "tiny/opt", "--model_name_or_path_finetune",
                                "tiny/opt", *flags])
    # DeepSpeed-Chat's defaults parse as before
    prompt_eval.parse_args(["--model_name_or_path_baseline", "tiny/opt", "--model_name_or_path_finetune", "tiny/opt",
                            "--num_beam_groups", "1"])


# ---------------------------------------------------------------- DeepSpeed-Chat's saved models
def save_like_deepspeed_chat(module: torch.nn.Module, config, directory, prefix: str = "") -> None:
    """What DeepSpeed-Chat's save_hf_format writes: config.json and a torch.save'd state dict (pickle)."""
    directory.mkdir(parents=True)
    config.to_json_file(str(directory / "config.json"))
    torch.save({prefix + key: value for key, value in module.state_dict().items()}, directory / "pytorch_model.bin")


def test_a_deepspeed_chat_actor_converts_to_the_same_logits(tmp_path, tokenizer):
    from applications import convert_dschat
    from training.utils.model.build import create_hf_model
    from training.utils.model.load import load_causal_lm

    torch.manual_seed(1)
    original = create_hf_model("tiny/opt", tokenizer).eval()
    save_like_deepspeed_chat(original, original.config, tmp_path / "ds_actor")
    assert convert_dschat.main(["--input", str(tmp_path / "ds_actor"), "--output", str(tmp_path / "actor"),
                                "--tokenizer", "tiny/opt"]) == "actor (causal LM)"
    converted, _ = load_causal_lm(str(tmp_path / "actor"), torch.device("cpu"))
    ids = torch.tensor([tokenizer("What is 2 + 3? 5")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids).logits, original(input_ids=ids).logits)
    assert (tmp_path / "actor" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "actor" / "prompt_format.json").read_text()) == {"prompt_format": "hh"}


def test_a_deepspeed_chat_reward_model_converts_to_the_same_scores(tmp_path, tokenizer):
    from applications import convert_dschat

    torch.manual_seed(2)
    original = create_reward_model("tiny/opt", tokenizer).eval()
    torch.nn.init.normal_(original.v_head.weight)
    ds_dir = tmp_path / "ds_reward"
    ds_dir.mkdir()
    original.config.to_json_file(str(ds_dir / "config.json"))
    state = {("rwtranrsformer." + k.removeprefix("backbone.") if k.startswith("backbone.") else k): v
             for k, v in original.state_dict().items()}
    torch.save(state, ds_dir / "pytorch_model.bin")
    assert convert_dschat.main(["--input", str(ds_dir), "--output", str(tmp_path / "reward"),
                                "--tokenizer", "tiny/opt"]) == "reward model"
    converted, _, meta = load_reward_model(str(tmp_path / "reward"))
    ids = torch.tensor([tokenizer("What is 2 + 3? 5")["input_ids"] + [tokenizer.eos_token_id]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(converted.eval()(ids, mask).end_scores, original(ids, mask).end_scores)
    assert meta["end_token_id"] == tokenizer.eos_token_id


class NotATensor:
    pass


def test_a_file_holding_more_than_tensors_is_refused(tmp_path, tokenizer, capsys):
    from applications import convert_dschat

    directory = tmp_path / "ds_actor"
    directory.mkdir()
    create_reward_model("tiny/opt", tokenizer).config.to_json_file(str(directory / "config.json"))
    torch.save({"decoder.embed_tokens.weight": torch.zeros(2, 2), "payload": NotATensor()}, directory /
               "pytorch_model.bin")
    with pytest.raises(SystemExit) as exit_:
        convert_dschat.main(["--input", str(directory), "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "holds more than tensors or is damaged (UnpicklingError" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
