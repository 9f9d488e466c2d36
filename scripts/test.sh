#!/usr/bin/env bash
# Install (with test tools) and run the checks: ruff, then the whole pytest suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
