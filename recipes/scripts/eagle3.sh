#!/bin/bash
# The shipped EAGLE-3 drafter for the built-in SmolLM2-135M-Instruct: training-time test (3 steps) on ShareGPT's
# training split, labels from the target's own teacher-forced predictions; held-out acc@d on the committed
# self-distilled held-out shard (recipes/data/sharegpt-sd). Resumable: re-run the same command.
#   bash recipes/scripts/eagle3.sh [RUN_DIR]      (default runs/eagle3-r1; about 1.5 h on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-runs/eagle3-r1}
FALCONSPEC=${FALCONSPEC:-.venv/bin/falconspec}
# two stages: 150 steps of one cosine schedule, then resumed with --max-steps 300 (a warm restart of the schedule;
# steps 151-300 see new conversations)
for STEPS in 150 300; do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$FALCONSPEC" -v train-eagle3 --out "$RUN" --max-samples 3000 \
        --max-steps $STEPS --lr 8e-4 --eval-samples 200 --eval-every 150 --vocab-samples 300 --seed 0
done
bash recipes/scripts/ship.sh "$RUN" eagle3
