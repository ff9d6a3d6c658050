#!/usr/bin/env bash
# Train AFA on MS COCO 2014 with NGPUS processes (default 4, the paper's global batch of 8).
#   bash launch/run_coco.sh [NGPUS] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${1:-4}; shift || true
exec torchrun --standalone --nproc_per_node="$NGPUS" tools/train.py --config configs/coco.yaml --resume auto "$@"
