"""Step 2 end to end: learning, round trip through rw_eval.py, two-rank ZeRO-3, LoRA, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, STEP1_DIR, assert_ok, read_metrics, run_script, write_jsonl

STEP2_DIR = REPO / "training" / "step2_reward_model_finetuning"
# The default synthetic pairs: 30% of rejected replies are the right copy followed by rambling without
# EOS (preferring the reply that stops needs the score read at the reply's EOS, so this checks the end
# convention end to end), the rest drop, add or stutter a digit.
SYNTHETIC = "synthetic/copy:size=3000,eval_size=300"


def step2_args(tmp_path, output, *extra, model="tiny/opt") -> list[str]:
    return ["main.py", "--model_name_or_path", model, "--data_path", SYNTHETIC, "--data_split", "1,8,1",
            "--data_output_path", str(tmp_path / "cache"), "--output_dir", str(output),
            "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--max_seq_len", "96",
            "--learning_rate", "1e-3", "--num_warmup_steps", "10", "--dtype", "fp32", "--dropout", "0.0", *extra]


def eval_rows(output) -> list[dict]:
    return [row for row in read_metrics(output) if "eval/accuracy" in row]


@pytest.fixture(scope="module")
def trained_reward_model(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm")
    output = tmp_path / "reward"
    args = step2_args(tmp_path, output, "--eval_interval", "50")
    result = run_script(STEP2_DIR, args)
    assert_ok(result)
    return tmp_path, output, result


def test_reward_model_learns_the_synthetic_preferences(trained_reward_model):
    _, output, result = trained_reward_model
    rows = eval_rows(output)
    assert 0.2 <= rows[0]["eval/accuracy"] <= 0.8, rows[0]  # near chance before training
    info = json.loads((output / "reward_model.json").read_text())
    assert info["reward_stats"]["accuracy"] >= 0.95, info["reward_stats"]
    assert info["reward_stats"]["chosen_mean"] > info["reward_stats"]["rejected_mean"]
    assert len(rows) >= 4  # before, every 50 steps, after the epoch
    assert "final (whole eval split): accuracy" in result.stdout


def test_rw_eval_reloads_the_trained_model_with_identical_scores(trained_reward_model, tmp_path):
    from training.utils.data.synthetic import generate_rows, parse_synthetic_name
    from training.utils.model.reward_model import load_reward_model

    _, output, _ = trained_reward_model
    rows = generate_rows(parse_synthetic_name(SYNTHETIC), "eval")[:40]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    result = run_script(STEP2_DIR, ["rw_eval.py", "--model_name_or_path", str(output), "--pairs", str(pairs),
                                    "--output_json", str(tmp_path / "scores.json")])
    assert_ok(result)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["accuracy"] >= 0.9
    # the same scores in this process, from the same directory
    from training.step2_reward_model_finetuning.rw_eval import score
    from training.utils.data.chat_format import PromptFormat

    model, tokenizer, _ = load_reward_model(str(output))
    model.eval()
    hh = PromptFormat(tokenizer)
    again = score(model, hh, [hh.prompt(r["prompt"]) for r in rows], [r["chosen"] for r in rows], 512, 8)
    assert torch.allclose(torch.tensor(again), torch.tensor(scores["chosen_scores"]), atol=1e-5)
    single = run_script(STEP2_DIR, ["rw_eval.py", "--model_name_or_path", str(output), "--prompt",
                                    rows[0]["prompt"], "--chosen", rows[0]["chosen"],
                                    "--rejected", rows[0]["rejected"]])
    assert_ok(single)
    summary = json.loads(single.stdout.strip().splitlines()[-1])
    assert abs(summary["mean_score"] - scores["chosen_scores"][0]) < 1e-4


def test_reward_model_from_a_step1_actor_with_lora(tmp_path):
    actor = tmp_path / "actor"
    assert_ok(run_script(STEP1_DIR, ["main.py", "--model_name_or_path", "tiny/opt", "--data_path", SYNTHETIC,
                                     "--data_split", "1,8,1", "--data_output_path", str(tmp_path / "cache"),
                                     "--output_dir", str(actor), "--max_seq_len", "64", "--dtype", "fp32"]))
    output = tmp_path / "reward"
    args = step2_args(tmp_path, output, "--lora_dim", "4", "--only_optimize_lora", "--lora_module_name", "layers.",
                      "--lora_learning_rate", "1e-2", model=str(actor))
    assert_ok(run_script(STEP2_DIR, args))
    actor_weights = load_file(str(actor / "model.safetensors"))
    saved = load_file(str(output / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    # frozen non-LoRA weights are exactly the actor's; LoRA-adapted projections changed (fused on save)
    frozen = [k for k in saved if "embed_tokens" in k or "layer_norm" in k]
    assert frozen and all(torch.equal(saved[k], actor_weights["model." + k]) for k in frozen)
    adapted = [k for k in saved if k.endswith("q_proj.weight")]
    assert adapted and any(not torch.equal(saved[k], actor_weights["model." + k]) for k in adapted)
    head = load_file(str(output / "value_head.safetensors"))["v_head.weight"]
    assert head.abs().sum() > 0


def test_two_ranks_zero3_train_save_and_reload(tmp_path):
    output = tmp_path / "reward"
    args = step2_args(tmp_path, output, "--zero_stage", "3", "--per_device_train_batch_size", "8",
                      "--data_split", "8,1,1")
    assert_ok(run_script(STEP2_DIR, args, num_ranks=2))
    info = json.loads((output / "reward_model.json").read_text())
    from training.utils.model.reward_model import load_reward_model

    model, tokenizer, _ = load_reward_model(str(output))
    ids = torch.tensor([[5, 6, 7, tokenizer.eos_token_id]])
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=torch.ones_like(ids)).end_scores
        second = load_reward_model(str(output))[0](input_ids=ids, attention_mask=torch.ones_like(ids)).end_scores
    assert torch.equal(first, second) and torch.isfinite(first).all()
    assert info["reward_stats"]["pairs"] > 0


def test_identical_pairs_are_counted_and_skipped(tmp_path):
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": f" good {i}", "rejected": f" bad {i}"}
            for i in range(60)]
    rows += [{"prompt": "\n\nHuman: same\n\nAssistant:", "chosen": " x", "rejected": " x"}] * 20
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output = tmp_path / "reward"
    args = step2_args(tmp_path, output, "--data_split", "0,1,0")
    args[args.index(SYNTHETIC)] = str(data)
    result = run_script(STEP2_DIR, args)
    assert_ok(result)
    stats = json.loads((output / "data_stats.json").read_text())
    assert stats["train"]["identical_pair"] + stats["eval"]["identical_pair"] == 20
    assert "identical_pair" in result.stdout


@pytest.mark.parametrize("case,change,message", [
    ("missing rejected", "no_rejected", "no usable phase-2 training rows"),
    ("unknown model family", "bad_family", "nonexistent-arch"),
])
def test_bad_input(tmp_path, case, change, message):
    output = tmp_path / "reward"
    args = step2_args(tmp_path, output)
    if change == "no_rejected":
        data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"q{i}", "response": f" a{i}"} for i in range(50)])
        args[args.index(SYNTHETIC)] = str(data)
    else:
        model_dir = tmp_path / "weird"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({"model_type": "nonexistent-arch"}))
        from training.utils.tokenizer import load_tokenizer

        load_tokenizer("tiny/opt").save_pretrained(model_dir)
        args[args.index("tiny/opt")] = str(model_dir)
    result = run_script(STEP2_DIR, args, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not output.exists()


def test_rw_eval_refuses_a_directory_that_is_not_a_reward_model(tmp_path):
    from training.utils.model.build import create_hf_model
    from training.utils.model.save import save_hf_format
    from training.utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("tiny/opt")
    save_hf_format(create_hf_model("tiny/opt", tokenizer), tokenizer, str(tmp_path / "actor"))
    result = run_script(STEP2_DIR, ["rw_eval.py", "--model_name_or_path", str(tmp_path / "actor"), "--prompt", "hi",
                                    "--chosen", "yo"])
    assert result.returncode == 2 and "not a reward model" in result.stderr
