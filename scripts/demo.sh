#!/usr/bin/env bash
# Sets everything up, then runs the main job on the embedded spoken-scenes corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec vgskit demo "$@"
