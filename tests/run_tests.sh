#!/usr/bin/env bash
# The project's test command (the README's and CI's): CPU only, offline, tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ruff check .  # the linter first (config in pyproject.toml): a violation fails the run
# Extra arguments go to pytest, e.g. the fast tier: bash tests/run_tests.sh -m "not slow"
exec python -m pytest -q -p no:cacheprovider --timeout 900 tests "$@"
