#!/bin/bash
# The shipped EAGLE-3 drafter for the built-in SmolLM2-135M-Instruct: training-time test (3 steps) on ShareGPT's
# training split, labels from the target's own teacher-forced predictions; held-out acc@d on the committed
# self-distilled held-out shard (recipes/data/sharegpt-sd). Resumable: re-run the same command.
#   bash recipes/scripts/eagle3.sh [RUN_DIR]      (default runs/eagle3-r1; about 40 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-runs/eagle3-r1}
FALCONSPEC=${FALCONSPEC:-.venv/bin/falconspec}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$FALCONSPEC" -v train-eagle3 --out "$RUN" --max-samples 3000 \
    --max-steps 150 --lr 8e-4 --eval-samples 200 --eval-every 75 --vocab-samples 300 --seed 0
bash recipes/scripts/ship.sh "$RUN" eagle3
