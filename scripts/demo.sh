#!/usr/bin/env bash
# Set up everything from scratch and run the demo on the bundled offline model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh demo
. .venv/bin/activate
seethrough demo "$@"
