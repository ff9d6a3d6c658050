#!/usr/bin/env bash
# Train AFA on PASCAL VOC 2012 with NGPUS processes (default 2, the paper's setting; 1 works too:
# the trainer accumulates gradients to keep the global batch of 4).
#   bash launch/run_voc.sh [NGPUS] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPUS=${1:-2}; shift || true
exec torchrun --standalone --nproc_per_node="$NGPUS" tools/train.py --config configs/voc.yaml --resume auto "$@"
