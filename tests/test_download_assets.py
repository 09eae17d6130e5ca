"""applications/download_assets.py (issue 19, item 7): models and datasets fetched into one folder that the steps
read offline. The hub cannot be reached from the tests, so its two entry points, huggingface_hub.snapshot_download
and datasets.load_dataset, are replaced by local stand-ins that write what the hub would give: a tiny OPT (with
safetensors, or with pickle weights only) and a small datasets.DatasetDict in the named dataset's layout."""
import json
from pathlib import Path

import pytest
import torch

from applications import download_assets
from training.utils.data.sources import open_source

PICKLED = "old-org/pickled-opt"  # a repo published with pytorch_model.bin only


def rm_static_rows(split: str, n: int) -> list[dict]:
    return [{"prompt": f"\n\nHuman: {split} question {i}\n\nAssistant:", "response": f" answer {i}",
             "chosen": f" good {split} {i}", "rejected": f" bad {split} {i}"} for i in range(n)]


class FakeHub:
    """snapshot_download and load_dataset as the hub would answer them; every call is recorded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.models, self.datasets = tokenizer, [], []

    def snapshot_download(self, *, repo_id, local_dir, ignore_patterns=None, allow_patterns=None):
        from training.utils.model.build import create_hf_model

        self.models.append((repo_id, ignore_patterns, allow_patterns))
        if repo_id == "no-such/model":
            raise OSError("404 Client Error: Repository Not Found for url: https://hub/api/models/no-such/model")
        directory = Path(local_dir)
        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = create_hf_model("tiny/opt", self.tokenizer)
        self.tokenizer.save_pretrained(str(directory))
        model.config.save_pretrained(str(directory))
        if repo_id != PICKLED:
            model.save_pretrained(str(directory))
        elif allow_patterns and "pytorch_model*.bin" in allow_patterns:  # only what the call asked for
            torch.save(model.state_dict(), directory / "pytorch_model.bin")
        return str(directory)

    def load_dataset(self, *args):
        import datasets

        self.datasets.append(args)
        if args[0] == "wikitext":
            return datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "Some text.\n"}] * 4)})
        return datasets.DatasetDict({split: datasets.Dataset.from_list(rm_static_rows(split, n))
                                     for split, n in (("train", 3), ("test", 2))})


@pytest.fixture
def hub(monkeypatch, tokenizer):
    fake = FakeHub(tokenizer)
    monkeypatch.setattr(download_assets, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(download_assets, "load_dataset", fake.load_dataset)
    return fake


def test_models_and_datasets_land_where_the_steps_find_them_by_name(tmp_path, hub, capsys):
    from training.utils.model.load import load_causal_lm

    out = tmp_path / "assets"
    result = download_assets.main(["--output", str(out), "--models", "facebook/opt-1.3b", PICKLED, "--datasets",
                                   "Dahoas/rm-static", "wikitext:wikitext-2-raw-v1", "mkqa-Chinese"])
    model, pickled = out / "models" / "facebook" / "opt-1.3b", out / "models" / "old-org" / "pickled-opt"
    assert result["models"] == {"facebook/opt-1.3b": str(model), PICKLED: str(pickled)}
    load_causal_lm(str(model), torch.device("cpu"))  # this project's loader, offline
    # pickle weights only: fetched in a second call and kept as safetensors (the steps never load pickle)
    assert [call[0] for call in hub.models] == ["facebook/opt-1.3b", PICKLED, PICKLED]
    assert "*.h5" in hub.models[0][1] and "*.bin" in hub.models[0][1]
    assert (pickled / "model.safetensors").is_file() and not (pickled / "pytorch_model.bin").exists()
    load_causal_lm(str(pickled), torch.device("cpu"))
    # datasets: the adapter of the name the folder ends with; mkqa-Chinese is the hub's mkqa
    assert hub.datasets == [("Dahoas/rm-static",), ("wikitext", "wikitext-2-raw-v1"), ("mkqa",)]
    source = open_source(str(out / "datasets" / "Dahoas" / "rm-static"))
    assert [s.chosen for s in source.rows("eval")] == [" good test 0", " good test 1"]  # rm-static's test split
    assert source.fingerprint.split(";")[0].endswith(":Dahoas/rm-static")
    assert (out / "datasets" / "wikitext" / "wikitext-2-raw-v1" / "dataset_dict.json").is_file()
    printed = capsys.readouterr().out
    assert f"--model_name_or_path {model}" in printed
    assert (f"--data_path {out}/datasets/Dahoas/rm-static {out}/datasets/wikitext/wikitext-2-raw-v1 "
            f"{out}/datasets/mkqa-Chinese") in printed
    # a second run fetches nothing
    hub.models.clear(), hub.datasets.clear()
    download_assets.main(["--output", str(out), "--models", "facebook/opt-1.3b", "--datasets", "Dahoas/rm-static"])
    assert hub.models == hub.datasets == []
    assert "model facebook/opt-1.3b: already there" in capsys.readouterr().out


DSCHAT_STYLE_SCRIPT = """#!/bin/bash
OUTPUT=$1
ACTOR_MODEL_PATH=${2:-AdamG012/chat-opt-1.3b-sft-deepspeed}
if [ "$CRITIC_MODEL_PATH" == "" ]; then CRITIC_MODEL_PATH=AdamG012/chat-opt-350m-reward-deepspeed; fi
# comments are skipped: --model_name_or_path not/this-one
deepspeed main.py \\
   --data_path Dahoas/rm-static mkqa-Chinese ./data/local synthetic/copy \\
   --model_name_or_path facebook/opt-1.3b \\
   --actor_model_name_or_path $ACTOR_MODEL_PATH --critic_model_name_or_path "$CRITIC_MODEL_PATH" \\
   --unsupervised_dataset_name wikitext --unsupervised_dataset_config_name wikitext-2-raw-v1 \\
   --output_dir $OUTPUT &> $OUTPUT/training.log
"""


def test_a_script_is_fetched_for_and_copied_naming_the_downloaded_folders(tmp_path, hub, capsys):
    scripts = tmp_path / "training_scripts" / "opt"
    (scripts / "single_gpu").mkdir(parents=True)
    (scripts / "run_dschat.sh").write_text(DSCHAT_STYLE_SCRIPT)
    wrapper = scripts / "single_gpu" / "run_wrapper.sh"  # a script that runs another one, as our aliases do
    wrapper.write_text('#!/usr/bin/env bash\nexec bash "$(dirname "${BASH_SOURCE[0]}")/../run_dschat.sh" "$@"\n')
    assert download_assets.script_names(str(scripts / "run_dschat.sh")) == (
        ["facebook/opt-1.3b", "AdamG012/chat-opt-1.3b-sft-deepspeed", "AdamG012/chat-opt-350m-reward-deepspeed"],
        ["Dahoas/rm-static", "mkqa-Chinese", "wikitext:wikitext-2-raw-v1"])
    out, there = tmp_path / "assets", "/mnt/assets"
    result = download_assets.main(["--output", str(out), "--script", str(wrapper), "--target_dir", there])
    assert len(result["models"]) == 3 and len(result["datasets"]) == 3
    wrapper_copy, copy = map(Path, result["scripts"])
    # in place relative to each other (outside the repository: to the scripts' common folder), so the wrapper's
    # copy runs the copy of the script it wraps
    assert wrapper_copy == out / "scripts" / "single_gpu" / "run_wrapper.sh"
    assert copy == out / "scripts" / "run_dschat.sh"
    text = copy.read_text()
    assert f"--model_name_or_path {there}/models/facebook/opt-1.3b" in text
    assert f"--data_path {there}/datasets/Dahoas/rm-static {there}/datasets/mkqa-Chinese ./data/local" in text
    assert f"--unsupervised_dataset_name {there}/datasets/wikitext/wikitext-2-raw-v1 " in text
    assert f"${{2:-{there}/models/AdamG012/chat-opt-1.3b-sft-deepspeed}}" in text
    assert "--unsupervised_dataset_config_name wikitext-2-raw-v1" in text  # a config name is no dataset name
    printed = capsys.readouterr().out
    assert f"bash {there}/scripts/single_gpu/run_wrapper.sh ..." in printed
    assert f"--model_name_or_path {there}/models/" in printed


def test_a_repository_launch_script_names_its_model_and_data():
    script = download_assets.REPO / "training/step2_reward_model_finetuning/training_scripts/opt/single_gpu/run_350m.sh"
    models, datasets = download_assets.script_names(str(script))
    assert models == ["facebook/opt-350m"] and "Dahoas/rm-static" in datasets


@pytest.mark.parametrize("argv, phrase", [
    ([], "nothing to download: pass --models, --datasets or --script"),
    (["--script", "no/such/run.sh"], "--script 'no/such/run.sh' is not a file"),
    (["--models", "no-such/model"], "could not download model 'no-such/model' (OSError: 404 Client Error"),
])
def test_bad_input_is_one_line_and_leaves_no_folder_under_the_assets_name(tmp_path, hub, capsys, argv, phrase):
    with pytest.raises(SystemExit) as exit_:
        download_assets.main(["--output", str(tmp_path / "assets"), *argv])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and phrase in error[0]
    assert not (tmp_path / "assets" / "models" / "no-such" / "model").exists()


def test_the_usage_names_the_layout_in_the_readme_notes():
    doc = download_assets.__doc__
    assert "/assets/models/facebook/opt-1.3b/" in doc and "/assets/datasets/Dahoas/rm-static/" in doc
    assert json.dumps(download_assets.dataset_args("mkqa-Japanese")) == '["mkqa"]'
