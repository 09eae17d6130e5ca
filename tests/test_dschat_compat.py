"""DeepSpeed-Chat habits that work unchanged: the evaluation tools' flags and defaults (issue 19)."""
import json

import pytest
import torch

from training.step1_supervised_finetuning import prompt_eval
from training.step2_reward_model_finetuning import rw_eval
from training.utils.data.chat_format import PromptFormat
from training.utils.errors import UserInputError
from training.utils.model.reward_model import create_reward_model, load_reward_model, save_reward_model


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("rm") / "reward"
    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(directory), reward_stats={})
    return directory


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
