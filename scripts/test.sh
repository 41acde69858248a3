#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite and the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
python3 -m ruff check src tests benchmarks
python3 -m pytest -q "$@"
