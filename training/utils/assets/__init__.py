"""Files shipped inside the package: the project's own byte-level BPE tokenizer (see README.md here)."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
