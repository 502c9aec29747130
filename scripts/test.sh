#!/usr/bin/env bash
# Set up everything from scratch and run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh test
. .venv/bin/activate
python -m pytest -q "$@"
