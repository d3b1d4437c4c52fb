#!/bin/bash
# the shipped drafters: k=2 (Falcon SAR, CSGD) and k=1 (EAGLE-style head), same data and settings
cd "$(dirname "$0")/../.."  # the repository root: every path below is relative to it
mkdir -p runs/recipes
nohup recipes/scripts/run.sh final-k2 sd-train --max-steps ${1:-600} --eval-every 50 --save-every 50 --eval-samples 48 > runs/recipes/final-k2.log 2>&1 &
nohup recipes/scripts/run.sh final-k1 sd-train --max-steps ${1:-600} --eval-every 50 --save-every 50 --eval-samples 48 --k 1 > runs/recipes/final-k1.log 2>&1 &
wait
