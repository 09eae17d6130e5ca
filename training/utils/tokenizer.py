"""Load a tokenizer offline and apply the project's special-token conventions.

Conventions (every step, and chat, relies on them):
- End of an assistant turn = `tokenizer.eos_token_id`, appended as an id (see data/conversation.py).
  `--add_eot_token` makes `--eot_token` a special token and *the* EOS, so the convention is unchanged; so does
  a chat template's end-of-turn token (data/chat_format.py).
- Pad is a real token distinct from EOS whenever we can add one. Masks never compare ids with pad:
  they come from lengths / attention masks, so even a pad == EOS tokenizer is handled correctly.
"""
import os

from training.utils.errors import UserInputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
DEFAULT_PAD = "<|pad|>"
DEFAULT_EOS = "<|endoftext|>"


def resolve_tokenizer_source(model_name_or_path: str) -> str:
    """Where the tokenizer files are: the shipped tokenizer for tiny configs, else the model itself."""
    from training.utils.model.configs import TINY_PREFIX, tiny_tokenizer_dir

    if model_name_or_path.startswith(TINY_PREFIX):
        return str(tiny_tokenizer_dir(model_name_or_path))
    if os.path.isdir(model_name_or_path):
        if not any(os.path.exists(os.path.join(model_name_or_path, f)) for f in TOKENIZER_FILES):
            raise UserInputError(
                f"model directory '{model_name_or_path}' has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                "save the tokenizer there with tokenizer.save_pretrained(dir)")
        return model_name_or_path
    if os.path.sep in model_name_or_path and not _looks_like_hub_id(model_name_or_path):
        raise UserInputError(f"model path '{model_name_or_path}' does not exist: pass an existing directory, "
                             "a hub id (with network), or tiny/opt | tiny/llama")
    return model_name_or_path


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_tokenizer(model_name_or_path: str, add_eot_token: bool = False, eot_token: str = DEFAULT_EOS,
                   trust_remote_code: bool = False):
    """A fast tokenizer with EOS and a distinct pad set. Local directories never touch the network."""
    from transformers import AutoTokenizer

    source = resolve_tokenizer_source(model_name_or_path)
    local = os.path.isdir(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        where = "directory" if local else "hub id (needs network)"
        raise UserInputError(f"cannot load a tokenizer from {where} '{source}': {str(err).splitlines()[0]}") from None
    if add_eot_token:
        tokenizer.add_special_tokens({"eos_token": eot_token})
    elif tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": DEFAULT_EOS})
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD})
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about the tokenizer that changes token ids (vocab, merges, specials)."""
    import hashlib

    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        len(tokenizer))).encode())
    return digest.hexdigest()
