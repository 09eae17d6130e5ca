"""Where e2e puts and finds each step's model (DeepSpeed-Chat's output tree), and the ZeRO stage of a command
e2e builds itself.

Folder names. DeepSpeed-Chat's e2e writes <output>/actor-models/<actor size>, <output>/reward-models/<reward
size> and <output>/step3-models/<actor size>, with OPT sizes such as 1.3b and 350m. e2e names a folder:
- for an OPT model given as a size (1.3b), a hub id (facebook/opt-1.3b) or a directory whose last component is
  opt-<size> (/assets/models/facebook/opt-1.3b): the size, `1.3b`, as DeepSpeed-Chat;
- for a tiny config (tiny/opt, the CPU default): the name after "tiny/", `opt`;
- for any other hub id or directory: its last component, e.g. `Llama-2-7b-hf`.
Earlier versions named OPT folders `opt-1.3b`: where such a folder exists and the new one does not, e2e keeps
using it (reads it and writes it), so an earlier output tree goes on working.

DeepSpeed-Chat's saved models. A step-1 or step-2 output that a later step reads and that DeepSpeed-Chat saved
(config.json + pytorch_model.bin, no safetensors) is converted first by applications/convert_dschat.py into
the sibling folder `<name>-safetensors` (reconverted when pytorch_model.bin is newer); the later step reads the
converted folder and DeepSpeed-Chat's is left as it is. The tokenizer is the base model DeepSpeed-Chat recorded
in config.json (`_name_or_path`, where DeepSpeed-Chat's own loader takes it from), else the model e2e was given.

ZeRO stages of built commands. Where the repository has no script for a model and deployment, e2e builds the
`deepspeed main.py` command. Unless --actor-zero-stage / --reward-zero-stage say otherwise, its ZeRO stage
follows DeepSpeed-Chat's scripts by model size: under 1B parameters 0; under 6B 0 on one GPU and 2 otherwise;
6B and more 3. Step 3's critic runs at the larger of the actor's and its own stage (DeepSpeed-Chat's scripts
give both the actor's). A model whose name gives no size keeps main.py's default.
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from training.utils.errors import UserInputError

CONVERTED_SUFFIX = "-safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"
SIZE = r"(\d+(?:\.\d+)?)([mb])"
TINY_PREFIX = "tiny/"
REPO = Path(__file__).resolve().parents[1]


def legacy_folder_name(model: str) -> str:
    """The folder name earlier versions of e2e used: the model's last path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1]) or "model"


def folder_name(model: str) -> str:
    """DeepSpeed-Chat's folder name for `model` (see the module docstring)."""
    last = model.rstrip("/").split("/")[-1]
    if re.fullmatch(rf"(?:opt-)?{SIZE}", last, flags=re.IGNORECASE):
        return last.lower().removeprefix("opt-")
    return legacy_folder_name(model)


def model_folder(parent: Path, model: str, suffix: str = "") -> Path:
    """`parent`/<DeepSpeed-Chat's name><suffix>, or the earlier name's folder where only that one exists."""
    new, old = parent / f"{folder_name(model)}{suffix}", parent / f"{legacy_folder_name(model)}{suffix}"
    return old if not new.exists() and old.is_dir() else new


def model_size_billions(model: str) -> float | None:
    """The parameter count a model's name states (1.3b, 350m, Llama-2-70b-hf), in billions; None if none."""
    if model.startswith(TINY_PREFIX):
        return None
    match = re.search(rf"(?<![a-z0-9.]){SIZE}(?![a-z0-9])", model.rstrip("/").split("/")[-1].lower())
    if match is None:
        return None
    number = float(match.group(1))
    return number if match.group(2) == "b" else number / 1000


def default_zero_stage(model: str, deployment: str) -> str:
    """The ZeRO stage DeepSpeed-Chat's scripts use for a model of this size ("" when the name gives none)."""
    size = model_size_billions(model)
    if size is None:
        return ""
    if size < 1:
        return "0"
    if size < 6:
        return "0" if deployment == "single_gpu" else "2"
    return "3"


def critic_zero_stage(actor: str, critic: str, deployment: str) -> str:
    stages = [s for s in (default_zero_stage(actor, deployment), default_zero_stage(critic, deployment)) if s]
    return max(stages, default="")


def model_id(name: str | None, default_size: str, cpu: bool) -> str:
    """DeepSpeed-Chat's bare OPT sizes (1.3b, 350m) become hub ids; everything else passes through."""
    if name is None:
        return "tiny/opt" if cpu else f"facebook/opt-{default_size}"
    return f"facebook/opt-{name}" if re.fullmatch(r"\d+(\.\d+)?[mb]", name) else name


def find_script(folder: str, deployment: str, model: str, names_model: bool = True) -> Path | None:
    """The per-topology script for `model`'s family and size on `deployment`, if the repo has one; with
    `names_model`, only a script that trains exactly that model (steps 1-2 name it inside the script)."""
    if deployment == "cpu":
        return REPO / "training" / folder / "training_scripts" / "cpu" / "run_tiny.sh"
    size = re.search(r"(\d+(?:\.\d+)?[mb])", model.lower())
    family = "llama2" if "llama-2" in model.lower() else model.lower().split("/")[-1].split("-")[0]
    if size is None:
        return None
    root = REPO / "training" / folder / "training_scripts" / family
    names = (f"run_{size.group(1)}.sh", f"run_{family}_{size.group(1)}.sh")  # DeepSpeed-Chat: run_llama2_7b.sh
    # Scripts directly in the family folder (DeepSpeed-Chat's llama2/) launch on all GPUs of one node.
    folders = (root / deployment,) + ((root,) if deployment == "single_node" else ())
    for candidate in (place / name for place in folders for name in names):
        if candidate.is_file() and (model in candidate.read_text() or not names_model):
            return candidate
    return None


# ---------------------------------------------------------------- DeepSpeed-Chat-saved inputs

def is_dschat_saved(directory: Path) -> bool:
    """config.json + pytorch_model.bin and no safetensors: what DeepSpeed-Chat's save_hf_format leaves."""
    if not directory.is_dir() or not (directory / PICKLE_WEIGHTS).is_file():
        return False
    return not any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json")
                   for name in os.listdir(directory))


@dataclass
class Conversion:
    """One DeepSpeed-Chat model converted for a later step (applications/convert_dschat.py)."""

    source: Path
    target: Path
    tokenizer: str

    def argv(self) -> list[str]:
        return ["--input", str(self.source), "--output", str(self.target), "--tokenizer", self.tokenizer]

    def shell_line(self) -> str:
        import shlex

        return shlex.join(["python", "applications/convert_dschat.py", *self.argv()])

    def run(self) -> None:
        from applications import convert_dschat

        try:  # the undecorated main: its error line becomes e2e's own, with the step that needs it
            convert_dschat.main.__wrapped__(self.argv())
        except UserInputError as err:
            raise UserInputError(f"converting the DeepSpeed-Chat model '{self.source}' (`{self.shell_line()}`) "
                                 f"failed: {err}") from None


def converted_input(directory: Path, base_model: str) -> tuple[Path, Conversion | None]:
    """The folder a later step reads for the step output `directory`: itself, or its converted sibling (with the
    conversion still to run, when the sibling is missing or older than DeepSpeed-Chat's weights)."""
    if not is_dschat_saved(directory):
        return directory, None
    target = directory.with_name(directory.name + CONVERTED_SUFFIX)
    weights = target / "model.safetensors"
    if weights.is_file() and weights.stat().st_mtime >= (directory / PICKLE_WEIGHTS).stat().st_mtime:
        return target, None
    return target, Conversion(directory, target, dschat_tokenizer(directory, base_model))


def dschat_tokenizer(directory: Path, base_model: str) -> str:
    """The tokenizer DeepSpeed-Chat used: config.json's `_name_or_path` (a tiny config, an existing directory or
    a hub id), else `base_model`."""
    try:
        recorded = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        recorded = ""
    parts = recorded.split("/")
    hub_id = len(parts) == 2 and all(parts) and not recorded.startswith((".", "~"))
    if recorded and os.path.realpath(recorded) != os.path.realpath(directory) and (
            recorded.startswith(TINY_PREFIX) or os.path.isdir(recorded) or hub_id):
        return recorded
    return base_model
