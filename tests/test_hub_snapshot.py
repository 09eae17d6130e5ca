"""A raw hub snapshot of a dataset as --data_path (issue 19, item 7): README.md / dataset_infos.json beside
data/*.parquet shards named as the hub names them, fetched file by file. The shards are generated here (the hub
cannot be reached from the tests) with `datasets.Dataset.to_parquet`, laid out as the hub lays them out."""
import json

import pytest

from training.utils.data.sources import open_source
from training.utils.errors import UserInputError


def pair(n: int) -> dict:
    return {"prompt": f"\n\nHuman: question {n}\n\nAssistant:", "response": f" answer {n}",
            "chosen": f" good answer {n}", "rejected": f" bad answer {n}"}


def write_shard(path, rows) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def hub_snapshot(root, shards: dict, card: bool = True):
    """`root` as a wget of the hub's files leaves it: shard name under data/ -> its rows."""
    root.mkdir(parents=True, exist_ok=True)
    if card:
        (root / "README.md").write_text("---\ndataset_info:\n  splits:\n  - name: train\n---\n")
        (root / "dataset_infos.json").write_text(json.dumps({"default": {"splits": {}}}))
    for name, rows in shards.items():
        write_shard(root / "data" / name, rows)
    return root


def test_an_rm_static_snapshot_loads_with_its_adapter_and_splits_from_the_shard_names(tmp_path):
    root = hub_snapshot(tmp_path / "mirror" / "Dahoas" / "rm-static", {
        "train-00000-of-00002-2a1df75c6bce91ab.parquet": [pair(0), pair(1)],
        "train-00001-of-00002-5e1f9a0b7c3d4e21.parquet": [pair(2)],
        "test-00000-of-00001-8c7c51afc6d45980.parquet": [pair(9)]})
    source = open_source(str(root))
    assert source.has_eval_split
    train = source.rows("train")
    assert [s.chosen for s in train] == [" good answer 0", " good answer 1", " good answer 2"]  # shards in order
    assert train[0].rejected == " bad answer 0" and train[0].prompt.endswith("\n\nAssistant:")
    assert [s.chosen for s in source.rows("eval")] == [" good answer 9"]  # rm-static evaluates on test
    assert source.fingerprint.startswith("snapshot:Dahoas/rm-static;train=")


def test_the_eval_split_is_the_datasets_own_and_shards_may_sit_in_split_folders(tmp_path):
    def shp(n: int) -> dict:
        return {"history": f"question {n}", "human_ref_A": f"a{n}", "human_ref_B": f"b{n}", "labels": 1}

    root = hub_snapshot(tmp_path / "stanfordnlp" / "SHP", {"train/0000.parquet": [shp(0)],
                                                           "test/0000.parquet": [shp(1)],
                                                           "validation/0000.parquet": [shp(2)]}, card=False)
    source = open_source(str(root))
    assert [s.chosen for s in source.rows("eval")] == [" a2"]  # SHP's validation, not test
    # a folder of no known name, without a card: one config's shards beside each other, generic rows
    other = tmp_path / "my-data"
    write_shard(other / "train-00000-of-00001.parquet", [pair(3)])
    assert [s.chosen for s in open_source(str(other)).rows("train")] == [" good answer 3"]
    assert not open_source(str(other)).has_eval_split


@pytest.mark.parametrize("files, phrase", [
    ({}, "looks like a hub dataset snapshot but has no data/*.parquet shards: fetch each data/*.parquet file"),
    ({"data/train-00000-of-00001.jsonl": b'{"prompt": "q"}\n'},
     "is a hub dataset snapshot whose data files (data/train-00000-of-00001.jsonl) are not Parquet shards"),
    ({"data/train-00000-of-00001.parquet": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"},
     "is a Git LFS pointer, not the file"),
    ({"data/train-00000-of-00001.parquet": b"<!DOCTYPE html><html><body>Dahoas/rm-static</body></html>"},
     "is an HTML page"),
    ({"data/train-00000-of-00001.parquet": b"PAR1\x15\x04\x15"}, "is cut short"),
])
def test_a_snapshot_without_parquet_shards_is_one_error_naming_the_path_and_the_fix(tmp_path, files, phrase):
    root = hub_snapshot(tmp_path / "Dahoas" / "rm-static", {})
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    with pytest.raises(UserInputError) as error:
        open_source(str(root))
    message = str(error.value)
    assert phrase in message and str(root) in message and "\n" not in message
    assert "resolve/main/" in message  # the fix: where to fetch the file from


def test_step_1_refuses_a_snapshot_without_shards_with_one_line_and_writes_nothing(tmp_path, capsys):
    from training.step1_supervised_finetuning import main as step1

    root = hub_snapshot(tmp_path / "Dahoas" / "rm-static", {})
    with pytest.raises(SystemExit) as exit_:
        step1.main(["--model_name_or_path", "tiny/opt", "--data_path", str(root), "--data_output_path",
                    str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--dtype", "fp32"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: '{root}' looks like a hub dataset snapshot but has no data/*.parquet")
    assert not (tmp_path / "out").exists()
