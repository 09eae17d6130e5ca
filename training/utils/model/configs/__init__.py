"""Small model shapes shipped in the repo, so tests and the CPU demo build random models offline.

Each `<stem>.json` here is a complete Hugging Face config dict including "model_type"; it is turned
into a config with `AutoConfig.for_model(model_type, **rest)`. A file's model name is `tiny/` plus
its stem without a leading `tiny-`:

    tiny/opt        tiny-opt.json        tiny/llama      tiny-llama.json
    tiny/opt-20m    opt-20m.json         tiny/llama-20m  llama-20m.json

    tiny/qwen2      tiny-qwen2.json      tiny/llama3     tiny-llama3.json

A file's optional "tokenizer" key names its tokenizer directory under `training/utils/assets/` (default
`tokenizer`, the shipped BPE tokenizer: vocab 4096, EOS/BOS id 0, pad id 1); the Qwen2- and Llama-3-style
shapes use that tokenizer extended with their family's special tokens and chat template
(`assets/chat_tokenizers.py`). Sizes and parameter counts are in README.md beside this file.
"""
import json
from pathlib import Path

from training.utils.errors import UserInputError

TINY_CONFIGS_DIR = Path(__file__).resolve().parent
TINY_PREFIX = "tiny/"
_FILE_STEM_PREFIX = "tiny-"


def _config_files() -> dict[str, Path]:
    return {TINY_PREFIX + path.stem.removeprefix(_FILE_STEM_PREFIX): path
            for path in sorted(TINY_CONFIGS_DIR.glob("*.json"))}


def list_tiny_configs() -> list[str]:
    """The accepted model names, e.g. ["tiny/llama", "tiny/llama-20m", "tiny/opt", "tiny/opt-20m"]."""
    return sorted(_config_files())


def _config_dict(name: str) -> dict:
    files = _config_files()
    if name not in files:
        raise UserInputError(f"unknown tiny model '{name}': use one of {', '.join(sorted(files))}")
    return json.loads(files[name].read_text(encoding="utf-8"))


def load_tiny_config(name: str):
    """The `transformers.PretrainedConfig` of a shipped shape; build the model with `from_config`."""
    from transformers import AutoConfig

    config_dict = _config_dict(name)
    config_dict.pop("tokenizer", None)
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)


def tiny_tokenizer_dir(name: str) -> Path:
    """The shipped tokenizer directory of a tiny shape."""
    from training.utils.assets import ASSETS_DIR

    return ASSETS_DIR / _config_dict(name).get("tokenizer", "tokenizer")
