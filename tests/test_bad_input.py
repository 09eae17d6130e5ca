"""The bad-input catalogue (README "Bad input"): one test per row, with the row's id.

Each case gives a real entry point one bad input and checks what a user sees: exit code 2, a last
stderr line `error: ...` (argparse's own errors: `main.py: error: ...`) that names the input, no
traceback, and no partial output: every file under the test's directory and the shared model
directories is byte-for-byte as before (so a new --output_dir does not exist afterwards).

Most cases run the entry point as a subprocess, as a user would. Cases whose check fires while the
flags are parsed (in_process=True) call its `main(argv)` in this process instead, which saves a
Python + DeepSpeed start-up (~3 s) per case; nothing after parse_args runs for them.
"""
import importlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, clean_env, write_jsonl, write_pickle_only_model_dir

DATA = "synthetic/copy:size=200,eval_size=20"
TOOLS = {  # name: (working directory, script, module for in-process runs, base flags)
    "step1": ("training/step1_supervised_finetuning", "main.py", "training.step1_supervised_finetuning.main", {
        "--model_name_or_path": "tiny/opt", "--data_path": DATA, "--data_output_path": "{tmp}/cache",
        "--output_dir": "{out}", "--dtype": "fp32", "--max_seq_len": "64"}),
    "step2": ("training/step2_reward_model_finetuning", "main.py", "training.step2_reward_model_finetuning.main", {
        "--model_name_or_path": "tiny/opt", "--data_path": DATA, "--data_output_path": "{tmp}/cache",
        "--output_dir": "{out}", "--dtype": "fp32", "--max_seq_len": "64"}),
    "dpo": ("training/step2_dpo_finetuning", "main.py", "training.step2_dpo_finetuning.main", {
        "--model_name_or_path": "tiny/opt", "--data_path": DATA, "--data_output_path": "{tmp}/cache",
        "--output_dir": "{out}", "--dtype": "fp32", "--max_seq_len": "64"}),
    "step3": ("training/step3_rlhf_finetuning", "main.py", "training.step3_rlhf_finetuning.main", {
        "--actor_model_name_or_path": "{actor}", "--critic_model_name_or_path": "{reward}", "--data_path": DATA,
        "--data_output_path": "{tmp}/cache", "--output_dir": "{out}", "--max_prompt_seq_len": "32",
        "--max_answer_seq_len": "16", "--per_device_generation_batch_size": "4",
        "--per_device_training_batch_size": "4"}),
    "chat": (".", "applications/chat.py", "applications.chat", {"--path": "{actor}", "--greedy": True}),
    "e2e": (".", "applications/e2e_rlhf.py", "applications.e2e_rlhf", {
        "--deployment-type": "cpu", "--quick": True, "--output-dir": "{out}"}),
}


@dataclass
class Case:
    id: str
    tool: str
    flags: dict  # overrides of the tool's base flags: a value, True for a bare flag, None to leave it out
    phrase: str  # must appear in the error line ({tmp}-style placeholders allowed)
    setup: object = None  # setup(tmp: Path, models: dict) writes the bad input
    in_process: bool = False
    env: dict = field(default_factory=dict)


def checkpoint_with(program: str, trainer_state: str | None = None):
    """A checkpoint step_00000010 in T/out: written by `program` (a configuration class name), or with the given
    trainer_state.json text."""
    def setup(tmp, models):
        step = tmp / "out" / "checkpoints" / "step_00000010"
        step.mkdir(parents=True)
        (step / "rank_0.pt").write_bytes(b"")
        state = {"position": {}, "metrics_history": [], "step_state": {},
                 "run": {"world_size": 1, "flags": {}, "program": program, "engines": []}}
        (step / "trainer_state.json").write_text(json.dumps(state) if trainer_state is None else trainer_state)
    return setup


def write_text(name: str, text: str):
    return lambda tmp, models: (tmp / name).write_text(text, encoding="utf-8")


def write_bytes(name: str, data: bytes):
    return lambda tmp, models: (tmp / name).write_bytes(data)


def model_dir_with(config: dict | None):
    """`tmp/model`: the shipped tokenizer, plus a config.json holding `config` when given."""
    def setup(tmp, models):
        from training.utils.tokenizer import load_tokenizer

        load_tokenizer("tiny/opt").save_pretrained(tmp / "model")
        if config is not None:
            (tmp / "model" / "config.json").write_text(json.dumps(config))
    return setup


def pickle_only_model_dir(tmp, models):
    from training.utils.model.build import create_hf_model
    from training.utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("tiny/opt")
    (tmp / "model").mkdir()
    write_pickle_only_model_dir(create_hf_model("tiny/opt", tokenizer), tmp / "model")
    tokenizer.save_pretrained(tmp / "model")


def output_dir_with_notes(tmp, models):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("not a model")


def sft_rows(tmp, models):
    write_jsonl(tmp / "rows.jsonl", [{"prompt": f"q{i}", "response": f" a{i}"} for i in range(50)])


def damaged_copy(name: str, damage):
    """`tmp/model`: a copy of the shared model `name` ("actor" or "reward") after `damage(directory)`."""
    def setup(tmp, models):
        shutil.copytree(models[name], tmp / "model")
        damage(tmp / "model")
    return setup


def cut_file(file_name: str, keep: float):
    """Keep the first `keep` share of the file's bytes (0: an empty file), as an interrupted copy leaves it."""
    def damage(directory: Path):
        data = (directory / file_name).read_bytes()
        (directory / file_name).write_bytes(data[:int(len(data) * keep)])
    return damage


def remove_file(file_name: str):
    return lambda directory: (directory / file_name).unlink()


def edit_reward_meta(edit):
    def damage(directory: Path):
        path = directory / "reward_model.json"
        path.write_text(edit(json.loads(path.read_text())))
    return damage


def without_end_token_id(meta: dict) -> str:
    meta.pop("end_token_id")
    return json.dumps(meta)


def ds_config_file(entries: dict):
    return write_text("ds.json", json.dumps(entries))


REMOTE_CODE = {"model_type": "fancy", "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig",
                                                   "AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"}}
ROWS = "{tmp}/rows.jsonl"

CASES = [
    # CLI flags and flag combinations
    Case("step1-only-lora-without-rank", "step1", {"--only_optimize_lora": True},
         "--only_optimize_lora needs --lora_dim > 0", in_process=True),
    Case("step1-zero-batch-size", "step1", {"--per_device_train_batch_size": "0"},
         "--per_device_train_batch_size must be at least 1", in_process=True),
    Case("step1-zero-stage-4", "step1", {"--zero_stage": "4"}, "argument --zero_stage: invalid choice: 4"),
    Case("step1-unknown-lr-scheduler", "step1", {"--lr_scheduler_type": "cosine_warm"},
         "argument --lr_scheduler_type: invalid choice: 'cosine_warm'", in_process=True),
    Case("step1-data-split-two-numbers", "step1", {"--data_split": "2,4"}, "--data_split must be three finite"),
    Case("step1-fp16-on-cpu", "step1", {"--dtype": "fp16"}, "--dtype fp16 is not supported on CPU"),
    Case("step1-offload-at-zero-0", "step1", {"--offload": True}, "--offload needs ZeRO stage 1, 2 or 3"),
    Case("step1-deepspeed-config-missing", "step1", {"--deepspeed_config": "{tmp}/ds.json"},
         "--deepspeed_config '{tmp}/ds.json' is not a readable JSON file"),
    Case("step1-deepspeed-config-not-an-object", "step1", {"--deepspeed_config": "{tmp}/ds.json"},
         "--deepspeed_config '{tmp}/ds.json' holds a JSON list", setup=write_text("ds.json", "[1, 2]")),
    Case("step1-no-output-dir", "step1", {"--output_dir": None},
         "the following arguments are required: --output_dir", in_process=True),
    Case("step1-output-dir-is-the-input-model", "step1", {"--model_name_or_path": "{actor}", "--output_dir": "{actor}"},
         "would overwrite the input --model_name_or_path '{actor}'", in_process=True),
    Case("step1-output-dir-holds-other-files", "step1", {}, "--output_dir '{out}' holds files that are not a saved "
         "model (notes.txt)", setup=output_dir_with_notes, in_process=True),
    Case("step2-output-dir-holds-another-run", "step2", {"--output_dir": "{actor}"},
         "--output_dir '{actor}' holds another run's language model", in_process=True),
    Case("dpo-label-smoothing-with-ipo", "dpo", {"--label_smoothing": "0.1", "--loss_type": "ipo"},
         "--label_smoothing applies to --loss_type sigmoid only", in_process=True),
    Case("dpo-zero-beta", "dpo", {"--beta": "0"}, "--beta must be positive", in_process=True),
    Case("step3-tp-without-zero-3", "step3", {"--inference_tp_size": "2"}, "--inference_tp_size 2 needs ZeRO stage 3"),
    Case("step3-offload-with-critic-at-zero-0", "step3", {"--offload": True, "--actor_zero_stage": "2"},
         "--offload moves the actor's and critic's partitioned optimizer state", in_process=True),
    Case("step3-only-lora-without-rank", "step3", {"--only_optimize_lora": True},
         "--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0", in_process=True),
    Case("step3-mixed-precision-lora-without-lora", "step3", {"--enable_mixed_precision_lora": True},
         "--enable_mixed_precision_lora needs --actor_lora_dim > 0", in_process=True),
    Case("step3-positive-truncation-penalty", "step3", {"--truncation_penalty": "1"},
         "--truncation_penalty would reward cut-off answers", in_process=True),
    Case("step3-test-mode-without-stop-step", "step3", {"--enable_test_mode": True},
         "--enable_test_mode needs --test_stop_step >= 1", in_process=True),
    Case("step3-output-dir-holds-the-actor", "step3", {"--output_dir": "{models}"},
         "would overwrite the input --actor_model_name_or_path '{actor}'", in_process=True),
    Case("chat-zero-new-tokens", "chat", {"--max_new_tokens": "0"}, "--max_new_tokens must be at least 1",
         in_process=True),
    Case("e2e-dpo-step-3", "e2e", {"--algo": "dpo", "--step": "3"}, "--algo dpo has no step 3", in_process=True),
    Case("e2e-step-3-without-earlier-steps", "e2e", {"--step": "3"}, "--step 3 needs the step-1 output '{out}"),
    Case("e2e-multi-node-without-hostfile", "e2e", {"--deployment-type": "multi_node"},
         "multi_node needs a hostfile, and '{tmp}/hostfile' does not exist", env={"HOSTFILE": "{tmp}/hostfile"}),
    # data files and dataset names
    Case("data-invalid-json-line", "step1", {"--data_path": ROWS}, "'{tmp}/rows.jsonl' line 3: invalid JSON",
         setup=write_text("rows.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')),
    Case("data-not-utf8", "step1", {"--data_path": ROWS}, "'{tmp}/rows.jsonl' is not UTF-8 text",
         setup=write_bytes("rows.jsonl", b'{"prompt": "caf\xe9", "response": "b"}\n')),
    Case("data-empty-file", "step1", {"--data_path": ROWS}, "'{tmp}/rows.jsonl' holds no rows",
         setup=write_text("rows.jsonl", "")),
    Case("data-unknown-fields", "step1", {"--data_path": ROWS}, "the first row has fields [question, answer]",
         setup=write_text("rows.jsonl", '{"question": "q", "answer": "a"}\n')),
    Case("data-pairs-without-rejected", "step2", {"--data_path": ROWS},
         "no usable phase-2 training rows in {tmp}/rows.jsonl", setup=sft_rows),
    Case("data-missing-file", "step1", {"--data_path": "{tmp}/missing.jsonl"},
         "'{tmp}/missing.jsonl': no such file"),
    Case("data-csv-file", "step1", {"--data_path": "{tmp}/rows.csv"}, "'{tmp}/rows.csv' is a file but not",
         setup=write_text("rows.csv", "prompt,response\nq,a\n")),
    Case("data-unknown-dataset", "step1", {"--data_path": "Nobody/no-such-data"},
         "unknown dataset 'Nobody/no-such-data'"),
    Case("data-hub-dataset-offline", "step1", {"--data_path": "Dahoas/rm-static"},
         "could not load 'Dahoas/rm-static' from the Hugging Face hub"),
    Case("data-bad-synthetic-parameter", "step1", {"--data_path": "synthetic/copy:size=many"},
         "bad value 'size=many' in 'synthetic/copy:size=many'"),
    Case("data-split-leaves-phase-empty", "step1", {"--data_split": "0,5,5"}, "leaves no training rows for phase 1"),
    Case("step3-every-prompt-too-long", "step3", {"--max_prompt_seq_len": "2", "--prompt_overflow": "drop"},
         "every prompt is longer than --max_prompt_seq_len 2"),
    Case("step3-unsupervised-file-missing", "step3", {"--unsupervised_dataset_name": "{tmp}/wiki.txt"},
         "unsupervised dataset '{tmp}/wiki.txt': no such file or directory"),
    # model directories
    Case("model-missing-dir", "step1", {"--model_name_or_path": "{tmp}/no-such-model"},
         "model path '{tmp}/no-such-model' does not exist"),
    Case("model-empty-dir", "step1", {"--model_name_or_path": "{tmp}/model"},
         "model directory '{tmp}/model' has no tokenizer files", setup=lambda tmp, models: (tmp / "model").mkdir()),
    Case("model-dir-without-config", "step1", {"--model_name_or_path": "{tmp}/model"},
         "model directory '{tmp}/model' has no config.json", setup=model_dir_with(None)),
    Case("model-unknown-architecture", "step1", {"--model_name_or_path": "{tmp}/model"},
         "transformers cannot build its config.json (model_type 'nonexistent-arch')",
         setup=model_dir_with({"model_type": "nonexistent-arch"})),
    Case("model-remote-code-not-trusted", "step1", {"--model_name_or_path": "{tmp}/model"},
         "model directory '{tmp}/model' runs its own Python code", setup=model_dir_with(REMOTE_CODE)),
    Case("model-pickle-weights-only", "step1", {"--model_name_or_path": "{tmp}/model"},
         "model directory '{tmp}/model' holds only pickle weights", setup=pickle_only_model_dir),
    Case("model-unknown-tiny-name", "step1", {"--model_name_or_path": "tiny/gpt5"}, "unknown tiny model 'tiny/gpt5'"),
    Case("step3-critic-not-a-reward-model", "step3", {"--critic_model_name_or_path": "{actor}"},
         "'{actor}' is not a reward model directory"),
    Case("step3-actor-and-reward-tokenizers-differ", "step3", {"--critic_model_name_or_path": "{reward_eot}"},
         "use different tokenizers"),
    Case("chat-missing-path", "chat", {"--path": "{tmp}/no-such-model"},
         "model path '{tmp}/no-such-model' does not exist"),
    Case("chat-reward-model-path", "chat", {"--path": "{reward}"}, "'{reward}' is a reward model"),
    # checkpoints and resume (rows for a checkpoint that does not fit the run are in tests/test_resume.py)
    Case("resume-without-a-checkpoint", "step1", {"--resume": True}, "--resume: no checkpoint in {out}/checkpoints",
         in_process=True),
    Case("dpo-resume-from-a-directory-without-checkpoints", "dpo", {"--resume": "{tmp}"},
         "--resume: no checkpoint in {tmp}", in_process=True),
    Case("output-dir-holds-checkpoints-of-another-run", "step2", {},
         "holds checkpoints of an earlier run (step_00000010)",
         setup=lambda tmp, models: (tmp / "out" / "checkpoints" / "step_00000010").mkdir(parents=True),
         in_process=True),
    Case("step3-negative-save-interval", "step3", {"--save_interval": "-1"}, "--save_interval must be at least 0",
         in_process=True),
    # issue 16: inputs (models, lengths, text, DeepSpeed config)
    Case("step1-max-seq-len-beyond-positions", "step1", {"--max_seq_len": "1024"},
         "--max_seq_len 1024 is more than the 512 positions of model 'tiny/opt'"),
    Case("step2-max-seq-len-beyond-positions", "step2", {"--max_seq_len": "600"},
         "--max_seq_len 600 is more than the 512 positions of model 'tiny/opt'"),
    Case("dpo-max-seq-len-beyond-positions", "dpo", {"--max_seq_len": "513"},
         "--max_seq_len 513 is more than the 512 positions of model 'tiny/opt'"),
    Case("step3-prompt-and-answer-beyond-positions", "step3", {"--max_prompt_seq_len": "400",
                                                               "--max_answer_seq_len": "200"},
         "--max_prompt_seq_len 400 + --max_answer_seq_len 200 = 600 is more than the 512 positions of model "
         "'{actor}'"),
    Case("step2-max-seq-len-below-every-reply", "step2", {"--max_seq_len": "4"},
         "--max_seq_len 4 is too small: every one of the"),
    Case("dpo-max-seq-len-below-every-reply", "dpo", {"--max_seq_len": "3"}, "--max_seq_len 3 is too small"),
    Case("model-truncated-safetensors", "step1", {"--model_name_or_path": "{tmp}/model"},
         "weights file '{tmp}/model/model.safetensors'",
         setup=damaged_copy("actor", cut_file("model.safetensors", 0.5))),
    Case("model-empty-safetensors", "step1", {"--model_name_or_path": "{tmp}/model"},
         "weights file '{tmp}/model/model.safetensors' (0 bytes) is damaged",
         setup=damaged_copy("actor", cut_file("model.safetensors", 0))),
    Case("dpo-model-dir-without-weights", "dpo", {"--model_name_or_path": "{tmp}/model"},
         "model directory '{tmp}/model' has config.json but no weights",
         setup=damaged_copy("actor", remove_file("model.safetensors"))),
    Case("step2-truncated-reward-model-weights", "step2", {"--model_name_or_path": "{tmp}/model"},
         "weights file '{tmp}/model/value_head.safetensors'",
         setup=damaged_copy("reward", cut_file("value_head.safetensors", 0.9))),
    Case("step3-reward-model-json-misses-a-key", "step3", {"--critic_model_name_or_path": "{tmp}/model"},
         "'{tmp}/model/reward_model.json' lacks end_token_id",
         setup=damaged_copy("reward", edit_reward_meta(without_end_token_id))),
    Case("step3-reward-model-json-not-json", "step3", {"--critic_model_name_or_path": "{tmp}/model"},
         "'{tmp}/model/reward_model.json' is not valid JSON",
         setup=damaged_copy("reward", edit_reward_meta(lambda meta: json.dumps(meta)[:-7]))),
    Case("step3-truncated-actor-weights", "step3", {"--actor_model_name_or_path": "{tmp}/model"},
         "weights file '{tmp}/model/model.safetensors'",
         setup=damaged_copy("actor", cut_file("model.safetensors", 0.3))),
    Case("chat-truncated-safetensors", "chat", {"--path": "{tmp}/model"},
         "weights file '{tmp}/model/model.safetensors'",
         setup=damaged_copy("actor", cut_file("model.safetensors", 0.5))),
    Case("step1-reward-model-as-model", "step1", {"--model_name_or_path": "{reward}"},
         "'{reward}' is a reward model (step 2 output), not a language model"),
    Case("dpo-reward-model-as-model", "dpo", {"--model_name_or_path": "{reward}"},
         "'{reward}' is a reward model (step 2 output), not a language model"),
    Case("step3-reward-model-as-actor", "step3", {"--actor_model_name_or_path": "{reward}"},
         "'{reward}' is a reward model (step 2 output), not a language model"),
    Case("step1-deepspeed-config-zero-stage-7", "step1", {"--deepspeed_config": "{tmp}/ds.json"},
         "--deepspeed_config '{tmp}/ds.json': \"zero_optimization.stage\": Input should be 0, 1, 2, 3",
         setup=ds_config_file({"zero_optimization": {"stage": 7}})),
    Case("step1-deepspeed-config-batch-size-text", "step1", {"--deepspeed_config": "{tmp}/ds.json"},
         "\"train_micro_batch_size_per_gpu\" must be an integer, got \"abc\"",
         setup=ds_config_file({"train_micro_batch_size_per_gpu": "abc"})),
    Case("step1-deepspeed-config-optimizer-number", "step1", {"--deepspeed_config": "{tmp}/ds.json"},
         "\"optimizer\" must be a JSON object, got 5", setup=ds_config_file({"optimizer": 5})),
    Case("dpo-deepspeed-config-negative-clipping", "dpo", {"--deepspeed_config": "{tmp}/ds.json"},
         "\"gradient_clipping\" must be at least 0.0, got -1", setup=ds_config_file({"gradient_clipping": -1})),
    Case("step3-deepspeed-config-zero-block-not-an-object", "step3", {"--deepspeed_config": "{tmp}/ds.json"},
         "\"zero_optimization\" must be a JSON object, got [3]", setup=ds_config_file({"zero_optimization": [3]})),
    Case("step3-unsupervised-file-not-utf8", "step3", {"--unsupervised_dataset_name": "{tmp}/wiki.txt"},
         "unsupervised dataset '{tmp}/wiki.txt' is not UTF-8 text: byte 13 (line 3)",
         setup=write_bytes("wiki.txt", b"first doc\n\nse\xffcond\n")),
    Case("step1-data-cache-inside-output-dir", "step1", {"--data_output_path": "{out}/cache"},
         "--data_output_path '{out}/cache' is inside --output_dir '{out}'", in_process=True),
    Case("step3-data-cache-is-output-dir", "step3", {"--data_output_path": "{out}"},
         "--data_output_path '{out}' is inside --output_dir '{out}'", in_process=True),
    # issue 16: results and e2e
    Case("step1-accumulation-beyond-the-run", "step1", {"--gradient_accumulation_steps": "1000"},
         "--gradient_accumulation_steps 1000 is more than the 3 micro-batches of the whole run"),
    Case("step2-accumulation-beyond-the-run", "step2", {"--gradient_accumulation_steps": "1000",
                                                        "--num_train_epochs": "2"},
         "micro-batches of the whole run"),
    Case("dpo-accumulation-beyond-the-run", "dpo", {"--gradient_accumulation_steps": "1000"},
         "so the optimizer would never step"),
    Case("step3-generation-batches-beyond-the-prompts", "step3", {"--generation_batches": "1000"},
         "--generation_batches 1000 is more than the 20 prompt batches of the whole run"),
    Case("step3-accumulation-beyond-the-run", "step3", {"--gradient_accumulation_steps": "50",
                                                        "--enable_test_mode": True, "--test_stop_step": "2"},
         "--gradient_accumulation_steps 50 is more than the 2 PPO mini-batches of the whole run"),
    Case("e2e-negative-check-prompts", "e2e", {"--check-prompts": "-1000"}, "--check-prompts must be at least 0",
         in_process=True),
    Case("e2e-zero-stage-out-of-range", "e2e", {"--actor-zero-stage": "4"}, "--actor-zero-stage: invalid choice",
         in_process=True),
    Case("e2e-output-dir-is-a-file", "e2e", {"--output-dir": "{tmp}/notes.txt"},
         "'{tmp}/notes.txt' is a file, not a directory", setup=write_text("notes.txt", "mine\n"), in_process=True),
    # issue 16: outputs, resume and checkpoints
    Case("step1-output-dir-under-a-file", "step1", {"--output_dir": "{tmp}/notes.txt/out"},
         "--output_dir '{tmp}/notes.txt/out' cannot be created (Not a directory)",
         setup=write_text("notes.txt", "mine\n")),
    Case("step2-output-dir-in-a-symlink-loop", "step2", {"--output_dir": "{tmp}/loop/out"},
         "--output_dir '{tmp}/loop/out' cannot be created (Too many levels of symbolic links)",
         setup=lambda tmp, models: (tmp / "loop").symlink_to(tmp / "loop")),
    Case("dpo-output-dir-in-proc", "dpo", {"--output_dir": "/proc/rlhf-out"},
         "--output_dir '/proc/rlhf-out' cannot be created ("),
    Case("step1-tensorboard-path-under-a-file", "step1", {"--enable_tensorboard": True,
                                                          "--tensorboard_path": "{tmp}/notes.txt/tb"},
         "--tensorboard_path '{tmp}/notes.txt/tb' cannot be created (Not a directory)",
         setup=write_text("notes.txt", "mine\n")),
    Case("step3-data-output-path-under-a-file", "step3", {"--data_output_path": "{tmp}/notes.txt/cache"},
         "--data_output_path '{tmp}/notes.txt/cache' cannot be created (Not a directory)",
         setup=write_text("notes.txt", "mine\n")),
    Case("resume-from-an-empty-trainer-state", "step1", {"--resume": True},
         "--resume: checkpoint {out}/checkpoints/step_00000010 is damaged or incomplete (trainer_state.json: "
         "JSONDecodeError", setup=checkpoint_with("step1", ""), in_process=True),
    Case("dpo-resume-from-a-step-2-checkpoint", "dpo", {"--resume": True},
         "--resume: {out}/checkpoints/step_00000010 is a checkpoint of step 2 (reward model), not of DPO: pass a "
         "checkpoint this step wrote", setup=checkpoint_with("RewardConfig"), in_process=True),
    # issue 20: prompt formats
    Case("step1-chat-template-without-a-template", "step1", {"--apply_chat_template": True},
         "--apply_chat_template: the tokenizer of 'tiny/opt' has no chat template: give one with --chat_template FILE"),
    Case("step2-chat-template-file-does-not-render", "step2", {"--chat_template": "{tmp}/chat.jinja"},
         "the chat template of --chat_template '{tmp}/chat.jinja' fails: TemplateSyntaxError",
         setup=write_text("chat.jinja", "{% for m in messages %}{{ m.content }")),
    Case("dpo-chat-template-without-a-generation-prompt", "dpo",
         {"--model_name_or_path": "tiny/qwen2", "--chat_template": "{tmp}/chat.jinja"},
         "has no generation prompt (rendering with add_generation_prompt changes nothing)",
         setup=write_text("chat.jinja", "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")),
    Case("step1-chat-template-empty-path", "step1", {"--chat_template": ""},
         "--chat_template must name a Jinja template file (got '')", in_process=True),
    Case("step1-chat-template-file-missing", "step1", {"--model_name_or_path": "tiny/qwen2",
                                                        "--chat_template": "{tmp}/none.jinja"},
         "--chat_template '{tmp}/none.jinja' cannot be read (FileNotFoundError)"),
    Case("step3-format-flag-contradicts-the-saved-format", "step3",
         {"--actor_model_name_or_path": "{template_actor}", "--critic_model_name_or_path": "{template_reward}",
          "--no_apply_chat_template": True},
         "--no_apply_chat_template contradicts the prompt format 'chat_template' that --actor_model_name_or_path "
         "'{template_actor}' was trained with: drop the flag", in_process=True),
    Case("step3-models-of-two-formats", "step3", {"--actor_model_name_or_path": "{template_actor}"},
         "the models were trained with different prompt formats: --actor_model_name_or_path '{template_actor}' "
         "(chat_template), --critic_model_name_or_path '{reward}' (hh)", in_process=True),
    Case("chat-format-flag-contradicts-the-saved-format", "chat", {"--path": "{template_actor}",
                                                                   "--no_apply_chat_template": True},
         "--no_apply_chat_template contradicts the prompt format 'chat_template' that --path", in_process=True),
    Case("step1-chat-template-with-add-eot-token", "step1", {"--model_name_or_path": "tiny/qwen2",
                                                              "--apply_chat_template": True, "--add_eot_token": True},
         "--add_eot_token with the chat template format: the template decides the end-of-turn token", in_process=True),
    Case("step1-messages-whose-roles-do-not-alternate", "step1",
         {"--model_name_or_path": "tiny/qwen2", "--apply_chat_template": True, "--data_path": ROWS},
         "--data_path {tmp}/rows.jsonl: a conversation's roles do not alternate (system?, user, assistant, user, ..., "
         "assistant): got user, user, assistant", setup=lambda tmp, models: write_jsonl(tmp / "rows.jsonl", [
             {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "user", "content": "again"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(20)])),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """An actor, a reward model and a reward model with another tokenizer (an extra end-of-turn token)."""
    from training.utils.data.chat_format import PROMPT_FORMAT_FILE, ChatTemplateFormat
    from training.utils.model.build import create_hf_model
    from training.utils.model.reward_model import create_reward_model, save_reward_model
    from training.utils.model.save import save_hf_format
    from training.utils.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer, eot_tokenizer = load_tokenizer("tiny/opt"), load_tokenizer("tiny/opt", True, "<|eot|>")
    hh = {PROMPT_FORMAT_FILE: {"prompt_format": "hh"}}  # as every step saves a model it trained in the HH format
    save_hf_format(create_hf_model("tiny/opt", tokenizer), tokenizer, str(root / "actor"), extra_json=hh)
    save_reward_model(create_reward_model("tiny/opt", tokenizer), tokenizer, str(root / "reward"), reward_stats={},
                      extra_json=hh)
    save_reward_model(create_reward_model("tiny/opt", eot_tokenizer), eot_tokenizer, str(root / "reward_eot"),
                      reward_stats={})
    chatml = ChatTemplateFormat(load_tokenizer("tiny/qwen2"), load_tokenizer("tiny/qwen2").chat_template, "tiny/qwen2")
    saved_format = {PROMPT_FORMAT_FILE: chatml.record()}  # as steps 1 and 2 save it with --apply_chat_template
    save_hf_format(create_hf_model("tiny/qwen2", chatml.tokenizer), chatml.tokenizer, str(root / "template_actor"),
                   extra_json=saved_format)
    save_reward_model(create_reward_model("tiny/qwen2", chatml.tokenizer), chatml.tokenizer,
                      str(root / "template_reward"), reward_stats={}, extra_json=saved_format)
    names = ("actor", "reward", "reward_eot", "template_actor", "template_reward")
    return {"models": str(root), **{name: str(root / name) for name in names}}


def argv_for(case: Case, paths: dict) -> list[str]:
    argv = []
    for flag, value in (TOOLS[case.tool][3] | case.flags).items():
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv += [flag, value.format(**paths)]
    return argv


def snapshot(*roots: Path) -> dict:
    """Every file's bytes and every directory under `roots`, except the data cache."""
    return {path: path.read_bytes() if path.is_file() else None
            for root in roots for path in sorted(root.rglob("*")) if "cache" not in path.relative_to(root).parts}


def run_as_subprocess(case: Case, argv: list[str], env: dict) -> tuple[int, str, str]:
    workdir, script, _, _ = TOOLS[case.tool]
    result = subprocess.run([sys.executable, script, *argv], cwd=REPO / workdir, env=clean_env(**env),
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def run_in_process(case: Case, argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(TOOLS[case.tool][2]).main(argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def check_case(case: Case, models: dict, tmp_path: Path, run) -> None:
    """Give the case's tool its bad input through `run(argv, env) -> (exit code, stdout, stderr)`; check what a
    user sees and that no file changed."""
    paths = {**models, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    if case.setup is not None:
        case.setup(tmp_path, models)
    before = snapshot(tmp_path, Path(models["models"]))
    env = {name: value.format(**paths) for name, value in case.env.items()}
    code, stdout, stderr = run(argv_for(case, paths), env)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert lines and re.match(r"(\S+: )?error: ", lines[-1]), stderr[-3000:]
    assert case.phrase.format(**paths) in lines[-1], lines[-1]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert snapshot(tmp_path, Path(models["models"])) == before  # no partial output, inputs untouched


# Two tests, so that the in-process cases stay in the fast tier (conftest.py marks the subprocess one slow).
SUBPROCESS_CASES = [case for case in CASES if not case.in_process]
IN_PROCESS_CASES = [case for case in CASES if case.in_process]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[case.id for case in SUBPROCESS_CASES])
def test_bad_input_ends_in_one_line_and_writes_nothing(case, models, tmp_path):
    check_case(case, models, tmp_path, lambda argv, env: run_as_subprocess(case, argv, env))


@pytest.mark.parametrize("case", IN_PROCESS_CASES, ids=[case.id for case in IN_PROCESS_CASES])
def test_bad_input_ends_in_one_line_and_writes_nothing_in_process(case, models, tmp_path, capsys):
    check_case(case, models, tmp_path, lambda argv, env: run_in_process(case, argv, capsys))


def test_every_case_is_a_row_of_the_readme_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"`([\w-]+)`\s*\|\s*$", table, flags=re.MULTILINE)
    assert len({case.id for case in CASES}) == len(CASES)
    assert {case.id for case in CASES} <= set(listed), {case.id for case in CASES} - set(listed)

