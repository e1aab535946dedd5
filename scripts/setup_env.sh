#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv with everything the recipes and tests need.
# torch is installed first and pinned, so no other package can pull a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/python -m pip install -q -c <(grep -E '^torch==' requirements.txt) -r requirements.txt
  echo "$want" > "$stamp"
fi
