#!/usr/bin/env bash
# Round 3 of the built-in model's drafters: grow the self-distilled training set from round 2's first 1,600 to the
# first 4,800 train-split conversations (same settings, so round 2's shards are reused as the prefix), then
# fine-tune the shipped round-2 Falcon, EAGLE-style and Medusa drafters on it. Same stages as round2.sh:
#   nohup bash recipes/round3.sh data > runs/round3-data.log 2>&1 &
#   nohup bash recipes/round3.sh train > runs/round3-train.log 2>&1 &
#   bash recipes/round3.sh ship
set -euo pipefail
export ROUND=3 N_TRAIN=4800 STEPS=2000
export MEDUSA_ARGS="--init-from medusa --lr 5e-4 --min-lr 5e-5 --max-steps 1200"
exec bash "$(dirname "$0")/round2.sh" "$@"
