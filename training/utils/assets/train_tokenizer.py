"""Train the shipped byte-level BPE tokenizer (vocab 4096) that tiny models and tests use offline.

Why our own: tests and the default demo must not download anything, and a 4096-entry vocab keeps the
tiny models' embeddings small. Digits are split one per token before BPE so that the arithmetic task
(`synthetic.py`) is learnable: "12345" is always 5 tokens, never a memorised chunk.

Reproduce the shipped files (from the repository root):

    python -m training.utils.assets.train_tokenizer

Corpus, in this order:
1. synthetic arithmetic text: prompt + response + chosen + rejected of every train row of
   `synthetic/arithmetic:size=5000,digits=3,ops=+-` (rambles included);
2. real English, Chinese and Japanese text from `<repo>/../shared/data/*_train.*.jsonl` (sorted by file
   name; prompt/response/chosen/rejected of each row joined), at most `BYTES_PER_FILE` UTF-8 bytes
   per file so no single source dominates and training takes seconds.
Without that directory the script trains on the synthetic text only and says so.

Training is deterministic: the same inputs give a byte-identical tokenizer.json.

Special tokens: `<|endoftext|>` (id 0) is EOS, BOS and UNK; `<|pad|>` (id 1) is a separate pad.
There is no post-processor: encoding never adds special tokens (the project appends EOS ids itself).
"""
import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from training.utils.assets import TOKENIZER_DIR
from training.utils.data.synthetic import ArithmeticSpec, generate_rows

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MODEL_MAX_LENGTH = 512  # the position limit of the shipped tiny configs
SYNTHETIC_SPEC = ArithmeticSpec(size=5000, digits=3, ops="+-")
BYTES_PER_FILE = 300_000
TEXT_FIELDS = ("prompt", "response", "chosen", "rejected")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def synthetic_texts() -> list[str]:
    return ["".join(row[field] for field in TEXT_FIELDS) for row in generate_rows(SYNTHETIC_SPEC, "train")]


def real_texts(data_dir: Path) -> list[str]:
    """Up to BYTES_PER_FILE bytes of joined text fields from each train file, in file and row order."""
    texts = []
    for path in sorted(data_dir.glob("*_train.*.jsonl")):
        budget = BYTES_PER_FILE
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                text = "".join(row[field] for field in TEXT_FIELDS if field in row)
                budget -= len(text.encode("utf-8"))
                if budget < 0:
                    break
                texts.append(text)
    return texts


def build_corpus(data_dir: Path) -> list[str]:
    corpus = synthetic_texts()
    if data_dir.is_dir():
        corpus += real_texts(data_dir)
    else:
        print(f"{data_dir} not found: training the tokenizer on synthetic arithmetic text only")
    return corpus


def train(corpus: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def save(tokenizer: Tokenizer, output_dir: Path) -> None:
    """Save through transformers so `AutoTokenizer.from_pretrained(output_dir)` gets every special token."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) must give text back exactly
    )
    wrapped.save_pretrained(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of *_train.*.jsonl files")
    parser.add_argument("--output_dir", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args()
    corpus = build_corpus(args.data_dir)
    print(f"training on {len(corpus)} texts, {sum(len(t.encode('utf-8')) for t in corpus)} bytes")
    save(train(corpus), args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
