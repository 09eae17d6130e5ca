"""A dataset folder as the Hugging Face hub stores it, fetched file by file (wget of each file's `resolve/main/`
URL, where even `datasets.load_dataset` cannot reach the hub):

    Dahoas/rm-static/README.md                  (and/or dataset_infos.json: read by nobody here)
    Dahoas/rm-static/data/train-00000-of-00001-<hash>.parquet
    Dahoas/rm-static/data/test-00000-of-00001-<hash>.parquet

The shards are the `.parquet` files under `data/` (or, without `data/`, beside README.md: one config's folder).
A shard's split is the start of its name (`train-00000-of-00002-<hash>.parquet` is train; `train.parquet` too),
or, for a name without one (`0000.parquet`), its folder's (`data/train/0000.parquet`). A split's shards are read
in name order. The rows go through the adapter the folder's path names, as for a save_to_disk folder
(`sources._adapter_for_path`: `.../Dahoas/rm-static` reads as Dahoas/rm-static), and the eval split is that
dataset's (test for rm-static) or the first of eval|validation|dev|test present.
"""
from __future__ import annotations

import re
from pathlib import Path

from training.utils.errors import UserInputError

CARD_FILES = ("README.md", "dataset_infos.json")
PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with it
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_.]*?)(?:-\d+-of-\d+)?(?:-[0-9a-f]{6,})?\.parquet$")
FETCH_HINT = ("fetch each data/*.parquet file of the dataset's 'Files' tab from its .../resolve/main/<file> URL "
              "(with wget or curl -L) into that folder, or on a machine with network run "
              "`python applications/download_assets.py --datasets NAME` (datasets.save_to_disk) and copy its output")


def is_snapshot(path: Path) -> bool:
    """Whether a directory looks like a hub snapshot: a dataset card, a data/ folder, or Parquet shards."""
    return (any((path / name).is_file() for name in CARD_FILES) or (path / "data").is_dir()
            or any(path.glob("*.parquet")))


def snapshot_shards(name: str, path: Path) -> dict[str, list[Path]]:
    """split -> its shards, in name order; one error line for a snapshot without readable Parquet shards."""
    data = path / "data" if (path / "data").is_dir() else path
    files = sorted(p for p in data.rglob("*") if p.is_file() and not p.name.startswith("."))
    shards = [p for p in files if p.suffix == ".parquet"]
    if not shards:
        others = [str(p.relative_to(path)) for p in files if p.name not in CARD_FILES]
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UserInputError(f"'{name}' is a hub dataset snapshot whose data files ({shown}) are not Parquet "
                                 f"shards: {FETCH_HINT}")
        raise UserInputError(f"'{name}' looks like a hub dataset snapshot but has no data/*.parquet shards: "
                             f"{FETCH_HINT}")
    splits: dict[str, list[Path]] = {}
    for shard in shards:
        check_parquet(shard)
        match = SHARD_NAME.match(shard.name)
        split = match.group("split") if match else shard.parent.name
        splits.setdefault(split.lower(), []).append(shard)
    return splits


def check_parquet(shard: Path) -> None:
    """A file named .parquet that is not one (an LFS pointer, an HTML page, a download cut short) is refused
    before any rows are read."""
    size = shard.stat().st_size
    with open(shard, "rb") as f:
        head = f.read(64)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head[:4] == PARQUET_MAGIC and tail == PARQUET_MAGIC and size >= 12:
        return
    if head.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer, not the file (cloned without git-lfs?)"
    elif head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        what = "an HTML page (fetched from a .../blob/... URL?)"
    elif head[:4] == PARQUET_MAGIC:
        what = f"cut short ({size} bytes, no Parquet footer)"
    else:
        what = f"not Parquet (it starts with {head[:16]!r})"
    raise UserInputError(f"'{shard}' is {what}: fetch it again from the hub's .../resolve/main/"
                         f"{shard.parent.name}/{shard.name} URL")


def read_shards(shards: list[Path]) -> list[dict]:
    from training.utils.data.sources import _read_parquet

    rows = [row for shard in shards for row in _read_parquet(shard)]
    if not rows:
        raise UserInputError(f"'{shards[0].parent}': the shards {', '.join(s.name for s in shards)} hold no rows: "
                             "fetch them again, or pass another dataset")
    return rows


def snapshot_source(name: str, path: Path):
    """The `sources.Source` of a hub snapshot folder."""
    from training.utils.data import sources

    known, adapter = sources._adapter_for_path(path)
    shards = snapshot_shards(name, path)
    preferred = (adapter.eval_split,) if adapter and adapter.eval_split else ()
    picked = sources._pick_splits(name, shards, preferred + sources.EVAL_SPLIT_NAMES)
    fingerprint = ";".join([f"snapshot:{known or 'generic'}"] + [
        f"{split}=" + ",".join(sources.file_fingerprint(shard) for shard in files) for split, files in picked.items()])
    return sources.Source(name, fingerprint=fingerprint, has_eval_split="eval" in picked,
                          read=lambda split: read_shards(picked[split]),
                          convert=adapter.convert if adapter else sources._generic,
                          fields=f"{adapter.fields} (the layout of {known})" if adapter else
                          f"{sources.GENERIC_SCHEMAS}, or a folder named after a known dataset (.../Dahoas/rm-static)")
