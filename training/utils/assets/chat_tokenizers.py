"""Build the shipped chat tokenizers of the tiny Qwen2- and Llama-3-style models from the project tokenizer.

    python -m training.utils.assets.chat_tokenizers     # rewrites tokenizer-chatml/ and tokenizer-llama3/

Each is the shipped byte-level BPE tokenizer (`tokenizer/`) plus the special tokens of its family and its chat
template (`templates/*.jinja`), so the tiny models exercise what real ones do: role headers, a default system
prompt (ChatML, as Qwen2's), an end-of-turn token (`<|im_end|>`, `<|eot_id|>`) distinct from EOS, and a BOS the
tokenizer itself adds (Llama 3). The build is deterministic: tests/test_chat_format.py rebuilds both and
compares them byte for byte with the shipped files.
"""
import os

from training.utils.assets import ASSETS_DIR, TOKENIZER_DIR
from training.utils.atomic_dir import atomic_directory

TEMPLATES_DIR = ASSETS_DIR / "templates"
CHAT_TOKENIZERS = {
    # directory: (added special tokens, BOS the tokenizer adds itself or None, template file)
    "tokenizer-chatml": (["<|im_start|>", "<|im_end|>"], None, "chatml.jinja"),
    "tokenizer-llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                         "<|begin_of_text|>", "llama3.jinja"),
}


def build_chat_tokenizer(name: str):
    """The tokenizer `name` (a key of CHAT_TOKENIZERS), in memory."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    special, bos, template_file = CHAT_TOKENIZERS[name]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    if bos is not None:
        tokenizer.add_special_tokens({"bos_token": bos})
        bos_id = tokenizer.convert_tokens_to_ids(bos)
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tokenizer.chat_template = (TEMPLATES_DIR / template_file).read_text(encoding="utf-8")
    return tokenizer


def write_chat_tokenizers(output_dir: str = str(ASSETS_DIR)) -> list[str]:
    """Write every chat tokenizer under `output_dir` (each directory replaced atomically); their paths."""
    written = []
    for name in CHAT_TOKENIZERS:
        path = os.path.join(output_dir, name)
        with atomic_directory(path, what="the tokenizer") as tmp:
            build_chat_tokenizer(name).save_pretrained(tmp)
        written.append(path)
    return written


def main() -> None:
    for path in write_chat_tokenizers():
        print(path)


if __name__ == "__main__":
    main()
