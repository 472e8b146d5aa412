#!/usr/bin/env bash
# One command to see Precedent work, with no clinical data and no server: sets up .venv, then
# makes synthetic breast ultrasound phantoms, trains a small model on them, runs the node on
# 127.0.0.1, sends it studies over DICOM and shows the findings, Grad-CAM images, Structured
# Reports and similar studies that come back. A few minutes on two CPU cores (the first setup
# takes longer: PyTorch is large). Everything goes to ./precedent-demo; results are on
# synthetic phantoms, not for clinical use.
# Usage: bash deploy/demo.sh [precedent demo options, e.g. --dir DIR --n 300 --push 30 --port 11112]
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/precedent demo "$@"
