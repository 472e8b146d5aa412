#!/usr/bin/env bash
# One command: set up and run the node on its embedded defaults (no server needed).
# AE title PRECEDENT on port 11112; data and catalog in ./precedent-data. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/precedent serve --config config/precedent.toml "$@"
