"""Download the models and datasets a run needs into one folder, for machines that cannot reach the hub.

    python applications/download_assets.py --output /assets --models facebook/opt-1.3b facebook/opt-350m \\
        --datasets Dahoas/rm-static Dahoas/full-hh-rlhf
    python applications/download_assets.py --output /assets \\
        --script training/step1_supervised_finetuning/training_scripts/opt/single_gpu/run_1.3b.sh

Run it where the hub can be reached; copy (or mount) the folder where it cannot. Layout, by hub name:

    /assets/models/facebook/opt-1.3b/        huggingface_hub.snapshot_download: config, tokenizer, *.safetensors
    /assets/datasets/Dahoas/rm-static/       datasets.load_dataset(...).save_to_disk
    /assets/datasets/wikitext/wikitext-2-raw-v1/   --datasets wikitext:wikitext-2-raw-v1 (a name:config pair)
    /assets/scripts/<step>/training_scripts/...    with --script: a copy of the script naming the folders above

Every step loads a model from its folder (`--model_name_or_path /assets/models/facebook/opt-1.3b`) and a dataset
from its folder with the adapter of the name its path ends with (`--data_path /assets/datasets/Dahoas/rm-static`
reads as Dahoas/rm-static), offline. What to pass is printed at the end; `--target_dir` writes the paths the
folder will have on the training machines. Weights are kept as safetensors only (a model published with pickle
weights only is converted here: this project never loads pickle weights); other frameworks' files are skipped.
An asset already complete in --output is not fetched again; each is written to a temporary sibling and renamed
into place, so an interrupted download leaves no half folder under its name (a model's partial download is
resumed by the next run).

`--script PATH` (one or more) fetches what a launch script names: the values of its --model_name_or_path,
--actor/critic_model_name_or_path, --data_path, --sft_only_data_path and --unsupervised_dataset_name (+ config)
flags that are hub names, also through shell variables with defaults (`ACTOR=${1:-org/model}`).
"""
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from training.utils.atomic_dir import atomic_directory
from training.utils.config import option, parse_config
from training.utils.errors import UserInputError, describe_error, report_user_errors

REPO = Path(__file__).resolve().parents[1]
MODEL_FLAGS = ("--model_name_or_path", "--actor_model_name_or_path", "--critic_model_name_or_path",
               "--model_name_or_path_baseline", "--model_name_or_path_finetune")
DATA_FLAGS = ("--data_path", "--sft_only_data_path")
UNSUPERVISED_FLAG, UNSUPERVISED_CONFIG_FLAG = "--unsupervised_dataset_name", "--unsupervised_dataset_config_name"
OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.onnx", "onnx/*", "*.ot", "*.tflite", "*.gguf", "coreml/*", "original/*"]
PICKLE = ["*.bin", "*.pt", "*.pth", "*.ckpt"]
PICKLE_WEIGHTS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
NOT_HUB_NAMES = ("synthetic/", "local/", "tiny/")


@dataclass
class AssetsConfig:
    output: str = option(help="The folder the assets go to (models/, datasets/, scripts/).", required=True)
    models: list[str] = option([], "Hub model ids, e.g. facebook/opt-1.3b meta-llama/Llama-2-7b-hf.")
    datasets: list[str] = option([], "Hub dataset names, e.g. Dahoas/rm-static; NAME:CONFIG for a configuration "
                                     "(wikitext:wikitext-2-raw-v1).")
    script: list[str] = option([], "Launch scripts whose models and datasets to fetch (and copy, naming the "
                                   "downloaded folders).")
    target_dir: str | None = option(None, "Where --output will be on the machines that train (default: --output): "
                                          "the printed flags and the script copies use it.")

    def validate(self) -> None:
        if not (self.models or self.datasets or self.script):
            raise UserInputError("nothing to download: pass --models, --datasets or --script")
        for path in self.script:
            if not os.path.isfile(path):
                raise UserInputError(f"--script '{path}' is not a file: pass a launch script, e.g. training/"
                                     "step1_supervised_finetuning/training_scripts/opt/single_gpu/run_1.3b.sh")


# ---------------------------------------------------------------- the hub (replaced by stand-ins in the tests)

def snapshot_download(**kwargs) -> str:
    import huggingface_hub

    return huggingface_hub.snapshot_download(**kwargs)


def load_dataset(*args):
    import datasets

    return datasets.load_dataset(*args)


# ---------------------------------------------------------------- where each asset goes

def model_dir(root: Path, repo_id: str) -> Path:
    return root / "models" / repo_id


def dataset_dir(root: Path, name: str) -> Path:
    return root / "datasets" / name.replace(":", "/")


def dataset_args(name: str) -> tuple:
    """The `load_dataset` arguments of a --datasets entry: a known name's (mkqa-Chinese is mkqa), or NAME:CONFIG."""
    from training.utils.data.sources import _ADAPTERS

    base, _, config = name.partition(":")
    known = _ADAPTERS.get(base)
    return (known.hub_args or (base,)) if known else ((base, config) if config else (base,))


# ---------------------------------------------------------------- downloads

def fetch_model(repo_id: str, target: Path) -> str:
    """snapshot_download into a hidden sibling (resumed by a later run), safetensors only, then renamed."""
    if (target / "config.json").is_file():
        return "already there"
    partial = target.with_name(f".{target.name}.partial")
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(partial), ignore_patterns=OTHER_FRAMEWORKS + PICKLE)
        if not any(partial.rglob("*.safetensors")):  # published with pickle weights only
            snapshot_download(repo_id=repo_id, local_dir=str(partial), allow_patterns=PICKLE_WEIGHTS)
            to_safetensors(repo_id, partial)
    except UserInputError:
        raise
    except Exception as err:  # the hub's errors (not found, gated, no network) have no common base
        raise UserInputError(f"could not download model '{repo_id}' ({describe_error(err)}): check the id, the network "
                             "(HF_ENDPOINT) and, for gated models (meta-llama/*), HF_TOKEN; run again to "
                             "resume") from None
    if not (partial / "config.json").is_file():
        raise UserInputError(f"model '{repo_id}' has no config.json on the hub: pass a transformers model id")
    os.replace(partial, target)
    return "downloaded"


def to_safetensors(repo_id: str, directory: Path) -> None:
    """Load the pickle weights tensors-only (transformers reads them with torch's weights-only loader) and save
    them as safetensors in their place."""
    import torch  # noqa: F401  (transformers needs it loaded)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")
    except Exception as err:
        raise UserInputError(f"model '{repo_id}' has pickle weights only and they did not load as a causal LM "
                             f"({describe_error(err)}): convert them with model.save_pretrained(dir)") from None
    model.save_pretrained(str(directory))
    for path in directory.iterdir():
        if path.is_file() and path.name.startswith("pytorch_model") and "safetensors" not in path.name:
            path.unlink()


def fetch_dataset(name: str, target: Path) -> str:
    if (target / "dataset_dict.json").is_file() or (target / "state.json").is_file():
        return "already there"
    args = dataset_args(name)
    try:
        loaded = load_dataset(*args)
    except Exception as err:  # the hub's and the dataset builders' errors have no common base
        raise UserInputError(f"could not download dataset '{name}' (datasets.load_dataset{args!r}: "
                             f"{describe_error(err)}): "
                             "check the name and the network; or fetch its data/*.parquet files one by one and pass "
                             "their folder (README: raw hub snapshots)") from None
    with atomic_directory(str(target), f"the dataset {name}") as tmp:
        loaded.save_to_disk(tmp)
    return "downloaded"


# ---------------------------------------------------------------- launch scripts

def scripts_and_callees(paths: list[str]) -> list[Path]:
    """The scripts and, depth first, the scripts they run (`exec bash "$(dirname ...)/../run_llama2_7b.sh"`)."""
    found: list[Path] = []
    stack = [Path(p).resolve() for p in reversed(paths)]
    while stack:
        path = stack.pop()
        if path in found:
            continue
        found.append(path)
        step = next((p for p in path.parents if p.parent == REPO / "training"), path.parent)
        for token in re.findall(r"[\w./${}()\[\]\"-]+\.sh\b", path.read_text(encoding="utf-8")):
            relative = re.split(r"[)}\"]", token)[-1].lstrip("/")  # after "$(dirname ...)/" or "${DIR}/"
            for base in (path.parent, step):  # beside the script, or the step folder the scripts run from
                if relative and (base / relative).resolve().is_file() and (base / relative).resolve() != path:
                    stack.append((base / relative).resolve())
                    break
    return found


def script_names(path: str) -> tuple[list[str], list[str]]:
    """(models, datasets) that the script's flags name as hub names, in order of appearance."""
    text = Path(path).read_text(encoding="utf-8").replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        try:
            lines.append(shlex.split(line, comments=True))
        except ValueError:  # a quote that spans lines, ...: not a flag line
            continue
    variables: dict[str, list[str]] = {}
    for tokens in lines:
        for token in tokens:
            match = re.fullmatch(r"(?:export\s+)?([A-Za-z_]\w*)=(.*)", token)
            if match:
                default = re.fullmatch(r"\$\{\w+:?-([^}]*)\}", match.group(2))
                value = default.group(1) if default else match.group(2).rstrip(";")
                variables.setdefault(match.group(1), []).append(value)
    models, datasets = [], []
    for tokens in lines:
        for index, token in enumerate(tokens):
            values = [v for raw in flag_values(tokens, index + 1) for v in expand(raw, variables)]
            if token in MODEL_FLAGS:
                models += [v for v in values if is_hub_name(v)]
            elif token in DATA_FLAGS:
                datasets += [v for v in values if is_hub_name(v) or is_known_dataset(v)]
            elif token == UNSUPERVISED_FLAG and values and is_hub_name(values[0], slash=False):
                config = next((expand(tokens[i + 1], variables)[:1] for i, t in enumerate(tokens[:-1])
                               if t == UNSUPERVISED_CONFIG_FLAG), [])
                datasets.append(values[0] + (f":{config[0]}" if config and is_hub_name(config[0], False) else ""))
    return list(dict.fromkeys(models)), list(dict.fromkeys(datasets))


def flag_values(tokens: list[str], start: int) -> list[str]:
    values = []
    for token in tokens[start:]:
        if token.startswith("-") or re.search(r"[|;&<>]", token):
            break
        values.append(token)
    return values


def expand(raw: str, variables: dict) -> list[str]:
    """`$NAME` / `${NAME}` -> the values the script assigns to NAME; other words as they are."""
    match = re.fullmatch(r"\$\{?(\w+)\}?", raw)
    return variables.get(match.group(1), []) if match else [raw]


def is_hub_name(value: str, slash: bool = True) -> bool:
    if "$" in value or value.startswith(NOT_HUB_NAMES) or value.startswith((".", "/", "~")) or os.path.exists(value):
        return False
    parts = value.split("/")
    return (len(parts) == 2 and all(parts)) if slash else (len(parts) <= 2 and all(parts))


def is_known_dataset(value: str) -> bool:
    from training.utils.data.sources import KNOWN_DATASETS

    return value in KNOWN_DATASETS


def offline_script(script: Path, root: Path, names: dict[str, Path], base: Path) -> Path:
    """A copy of `script` under root/scripts/ with every downloaded hub name replaced by its folder. It keeps its
    place relative to training/ (or, outside the repository, to `base`), so the scripts it runs are found."""
    source = Path(script).resolve()
    inside = source.is_relative_to(REPO / "training")
    target = root / "scripts" / source.relative_to(REPO / "training" if inside else base)
    text = source.read_text(encoding="utf-8")
    for name, folder in sorted(names.items(), key=lambda item: -len(item[0])):
        text = re.sub(rf"(?<![\w/.])(?<!\w-){re.escape(name)}(?![\w/.-])", str(folder), text)  # also ${1:-NAME}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    shutil.copymode(source, tmp)
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------- main

@report_user_errors
def main(argv=None) -> dict:
    config = parse_config(AssetsConfig, argv, __doc__.split("\n")[0])
    root = Path(config.output).resolve()
    there = Path(config.target_dir) if config.target_dir else root
    models, datasets = list(config.models), list(config.datasets)
    scripts = scripts_and_callees(config.script)
    for script in scripts:
        named_models, named_datasets = script_names(str(script))
        models += named_models
        datasets += named_datasets
    models, datasets = list(dict.fromkeys(models)), list(dict.fromkeys(datasets))
    for repo_id in models:
        print(f"model {repo_id}: {fetch_model(repo_id, model_dir(root, repo_id))}", flush=True)
    for name in datasets:
        print(f"dataset {name}: {fetch_dataset(name, dataset_dir(root, name))}", flush=True)
    paths = {m: model_dir(there, m) for m in models} | {d.partition(":")[0]: dataset_dir(there, d) for d in datasets}
    print(f"\nAssets in {root}" + (f" (on the training machines: {there})" if there != root else "") +
          ". Where the hub cannot be reached, set HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 and pass:")
    for repo_id in models:
        print(f"  --model_name_or_path {model_dir(there, repo_id)}    (e2e: --actor-model / --reward-model)")
    if datasets:
        print(f"  --data_path {' '.join(str(dataset_dir(there, d)) for d in datasets)}")
    outside = [s.parent for s in scripts if not s.is_relative_to(REPO / "training")]
    base = Path(os.path.commonpath(outside)) if outside else REPO
    copies = [offline_script(script, root, paths, base) for script in scripts]  # callees too: wrappers run them
    for script, copy in zip(config.script, copies):
        step = next((p.name for p in Path(script).resolve().parents if p.parent == REPO / "training"), None)
        where = f"cd training/{step} && " if step else ""
        print(f"  {script}, naming these folders: ({where}bash {there / copy.relative_to(root)} ...)")
    if not models and not datasets:
        print(f"  (the scripts {', '.join(config.script)} name no hub model or dataset)")
    return {"models": {m: str(model_dir(root, m)) for m in models},
            "datasets": {d: str(dataset_dir(root, d)) for d in datasets}, "scripts": [str(c) for c in copies]}


if __name__ == "__main__":
    main()
