#!/usr/bin/env bash
# Install (with test tools) and run the checks: ruff, a strict build of the docs site, then the whole pytest suite,
# offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks
# The site goes to a temporary folder, never into the repository; --strict fails on any warning (a broken link).
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -q -d "$site"
.venv/bin/python -m pytest "$@"
